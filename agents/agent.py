"""Tool-using agents on LangChain 1.x (``langchain.agents.create_agent``) against the agentloop gateway.

What it owns: ``Agent`` — one compiled agent graph over a ToolRegistry's tools
and a ``ChatOpenAI`` pointed at the gateway, run per task with per-run
switches (thinking, a forced tool choice); ``AgentRun`` — what a run did,
including the completion id of every model call; and trajectory feedback
(``Agent.feedback``) that sends a run's outcome to the gateway's learning loop.

Invariants
- A run never crashes on a tool: the registry turns validation errors,
  exceptions and timeouts into tool results the model reads (status "error").
- A run makes at most ``max_steps`` model calls; when it would make more, it
  stops with a final message saying so (``AgentRun.hit_step_limit``).
- A forced tool choice applies only to the first model call after the user
  spoke; once a tool result is in, the model answers freely (forcing every
  call would loop until the step limit).
- ``AgentRun.completion_ids`` lists, in order, the gateway response ``id`` of
  every model call of that run and only that run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelCallLimitMiddleware
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from agentloop.tools.registry import ToolRegistry

from agentloop.agents.gateway import FeedbackClient, chat_model, thinking_body, trajectory_feedback

_UNSET: Any = object()


@dataclass
class AgentContext:
    """Per-run switches, passed to the graph as its runtime context."""

    force_tool: str | None = None  # None, "required" (any tool) or a tool name
    thinking: bool = False


@dataclass
class AgentRun:
    """The outcome of one ``Agent.run``."""

    answer: str
    messages: list[BaseMessage]        # the whole conversation after the run
    new_messages: list[BaseMessage]    # what this run added (model turns, tool results)
    completion_ids: list[str]
    tool_calls: list[dict[str, Any]]   # LangChain ToolCall dicts, in the order the model made them
    tool_results: list[ToolMessage]
    hit_step_limit: bool
    seconds: float
    model_calls: int = field(init=False)

    def __post_init__(self) -> None:
        self.model_calls = len(self.completion_ids)


class ForceToolChoice(AgentMiddleware):
    """Sets ``tool_choice`` on the first model call of a turn (see the module invariants).

    For small models that do not pick a tool on their own: ``"required"``
    makes the server constrain the output to some tool call, a tool name to
    that tool's call.
    """

    def __init__(self, default: str | None = None) -> None:
        super().__init__()
        self.default = default

    def _choice(self, request) -> str | None:
        ctx = getattr(request.runtime, "context", None)
        choice = ctx.force_tool if isinstance(ctx, AgentContext) else self.default
        if not choice:
            return None
        for m in reversed(request.messages):
            if isinstance(m, ToolMessage):
                return None  # a tool already answered in this turn
            if isinstance(m, HumanMessage):
                break
        return choice

    def _settings(self, request):
        ctx = getattr(request.runtime, "context", None)
        overrides: dict[str, Any] = {}
        if isinstance(ctx, AgentContext):
            # The model's default extra_body carries the agent's default switch; a
            # per-run context replaces it for this call only.
            overrides["model_settings"] = {**request.model_settings, "extra_body": thinking_body(ctx.thinking)}
        choice = self._choice(request)
        if choice is not None and request.tools:
            overrides["tool_choice"] = choice
        return request.override(**overrides) if overrides else request

    def wrap_model_call(self, request, handler):
        return handler(self._settings(request))

    async def awrap_model_call(self, request, handler):
        return await handler(self._settings(request))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return "" if content is None else str(content)


def _as_messages(task: str | Sequence[Any]) -> list[Any]:
    if isinstance(task, str):
        return [HumanMessage(task)]
    return list(task)


class Agent:
    """A tool-calling agent on the gateway. Build once, ``run`` many tasks."""

    def __init__(self, registry: ToolRegistry, *, url: str, api_key: str = "agentloop", model: str = "agentloop",
                 tools: Sequence[str] | None = None, system_prompt: str | None = None, thinking: bool = False,
                 force_tool: str | None = None, max_steps: int = 6, temperature: float = 0.0,
                 max_tokens: int = 256, timeout: float = 120.0, llm: Any = None) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if force_tool not in (None, "required") and force_tool not in registry:
            raise ValueError(f"force_tool {force_tool!r} is not a registered tool")
        self.registry = registry
        self.url, self.api_key = url, api_key
        self.thinking, self.force_tool, self.max_steps = thinking, force_tool, max_steps
        self.llm = llm if llm is not None else chat_model(url, api_key, model, thinking=thinking,
                                                          temperature=temperature, max_tokens=max_tokens,
                                                          timeout=timeout)
        self.graph = create_agent(
            self.llm, registry.langchain_tools(tools), system_prompt=system_prompt,
            middleware=[ForceToolChoice(force_tool),
                        ModelCallLimitMiddleware(run_limit=max_steps, exit_behavior="end")],
            context_schema=AgentContext, name="agentloop_agent")
        self._feedback: FeedbackClient | None = None

    def _context(self, force_tool: Any, thinking: Any) -> AgentContext:
        force = self.force_tool if force_tool is _UNSET else force_tool
        if force not in (None, "required") and force not in self.registry:
            raise ValueError(f"force_tool {force!r} is not a registered tool")
        return AgentContext(force_tool=force, thinking=self.thinking if thinking is _UNSET else bool(thinking))

    def _config(self) -> dict[str, Any]:
        # Each step is a model node plus a tools node (and middleware nodes):
        # generous, since the call limit is what actually bounds a run.
        return {"recursion_limit": 4 * self.max_steps + 10}

    def run(self, task: str | Sequence[Any], *, force_tool: str | None = _UNSET, thinking: bool = _UNSET) -> AgentRun:
        """Run one task (a user message, or a whole conversation) to its final answer."""
        start = time.monotonic()
        inputs = _as_messages(task)
        out = self.graph.invoke({"messages": inputs}, self._config(), context=self._context(force_tool, thinking))
        return self._result(inputs, out["messages"], start)

    async def arun(self, task: str | Sequence[Any], *, force_tool: str | None = _UNSET,
                   thinking: bool = _UNSET) -> AgentRun:
        start = time.monotonic()
        inputs = _as_messages(task)
        out = await self.graph.ainvoke({"messages": inputs}, self._config(),
                                       context=self._context(force_tool, thinking))
        return self._result(inputs, out["messages"], start)

    def _result(self, inputs: list[Any], messages: list[BaseMessage], start: float) -> AgentRun:
        new = list(messages[len(inputs):])
        ais = [m for m in new if isinstance(m, AIMessage)]
        ids = [m.response_metadata["id"] for m in ais if m.response_metadata.get("id")]
        final = ais[-1] if ais else None
        # The call-limit middleware ends a run with a message of its own, which
        # no model call produced (so it carries no response id).
        hit_limit = final is not None and not final.response_metadata.get("id") and len(ids) >= self.max_steps
        return AgentRun(
            answer=_text(final.content) if final is not None else "",
            messages=list(messages), new_messages=new, completion_ids=ids,
            tool_calls=[tc for m in ais for tc in m.tool_calls],
            tool_results=[m for m in new if isinstance(m, ToolMessage)],
            hit_step_limit=hit_limit, seconds=time.monotonic() - start)

    # ---------------------------------------------------------------- feedback

    def feedback(self, run: AgentRun, verdict: int | str | dict[str, Any],
                 comment: str | None = None) -> list[dict[str, Any]]:
        """Send a run's outcome to the learning loop.

        ``+1``/``-1`` is a thumbs on every completion of the run; a string (or
        an assistant message) corrects the run's last completion.
        """
        if self._feedback is None:
            self._feedback = FeedbackClient(self.url, self.api_key)
        return trajectory_feedback(self._feedback, run.completion_ids, verdict, comment)

    def close(self) -> None:
        if self._feedback is not None:
            self._feedback.close()


def build_agent(registry: ToolRegistry, *, url: str, **kwargs: Any) -> Agent:
    """``Agent(registry, url=..., ...)``; see ``Agent`` for the options."""
    return Agent(registry, url=url, **kwargs)
