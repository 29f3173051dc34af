"""The tool registry: typed Python functions → validated, time-limited, never-crashing tools.

What it owns: turning a function into a tool (its JSON schema comes from the
type hints and the Google-style docstring through LangChain's
``StructuredTool.from_function``/``convert_to_openai_tool`` — no converter of
our own), validating a call's arguments against the pydantic model built from
the same hints, running it under a per-call timeout, and handing the same
tools out as OpenAI ``tools=[...]`` entries and as LangChain tools.

Invariants
- A tool call always yields a ``ToolResult`` whose content tells the model what
  happened: bad JSON, unknown tool, invalid or unexpected arguments, an
  exception, a timeout — each becomes a readable result, never an exception
  out of ``run``/``execute`` (the model can read the error and recover).
- Arguments are validated before the function runs; the function never sees
  raw model output.
- ``execute``/``aexecute`` run the calls of one turn concurrently and return
  the results in the calls' order, each carrying its call's ``tool_call_id``.
- The OpenAI entry and the LangChain tool of a name describe the same schema
  and go through the same validation and execution path.

A sync function that ignores its timeout cannot be killed (Python threads
cannot be); it runs in a daemon thread whose late result is discarded, so a
hung tool costs a thread, never the agent.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from langchain_core.tools import StructuredTool, ToolException
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ValidationError

DEFAULT_TIMEOUT = 10.0
MAX_RESULT_CHARS = 20_000  # a tool result goes back into the prompt: keep it bounded


@dataclass(frozen=True)
class ToolResult:
    """What one tool call produced, ready to go back to the model."""

    tool_call_id: str
    name: str
    content: str
    ok: bool
    # None when ok; else "bad_json" | "unknown_tool" | "invalid_arguments" | "timeout" | "exception"
    error: str | None = None
    seconds: float = 0.0

    def message(self) -> dict[str, Any]:
        """The OpenAI ``role: tool`` message for this result."""
        return {"role": "tool", "tool_call_id": self.tool_call_id, "name": self.name, "content": self.content}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[BaseModel]   # validates arguments (built from the type hints)
    parameters: dict[str, Any]    # the JSON schema the model sees
    timeout: float

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def openai(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class _Prepared:
    """A call after parsing and validation: either kwargs to run or a finished result."""

    tool: Tool | None
    kwargs: dict[str, Any] | None
    failed: ToolResult | None


def normalize_call(call: Any) -> tuple[str, str, Any]:
    """(id, name, arguments) of a tool call in any of the shapes we meet.

    OpenAI wire dicts (``{"id", "function": {"name", "arguments": "<json>"}}``),
    ``openai`` SDK objects, and LangChain ``ToolCall`` dicts (``{"id", "name", "args"}``).
    """
    if isinstance(call, Mapping):
        if "function" in call:
            fn = call["function"] or {}
            return str(call.get("id") or ""), str(fn.get("name") or ""), fn.get("arguments")
        return str(call.get("id") or ""), str(call.get("name") or ""), call.get("args")
    fn = getattr(call, "function", None)
    if fn is not None:
        return str(getattr(call, "id", "") or ""), str(fn.name or ""), fn.arguments
    raise TypeError(f"not a tool call: {call!r}")


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e.get("loc", ())) or "arguments"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


def to_content(value: Any) -> str:
    """A tool's return value as tool-message text: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, BaseModel):
        text = value.model_dump_json()
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[truncated: {len(text) - MAX_RESULT_CHARS} more characters]"
    return text


class ToolRegistry:
    """Named tools built from typed functions; see the module docstring for the contract."""

    def __init__(self, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.default_timeout = default_timeout
        self._tools: dict[str, Tool] = {}

    # ---------------------------------------------------------------- registration

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 description: str | None = None, timeout: float | None = None):
        """Register ``fn`` (sync or async) as a tool; usable as ``@registry.register`` too.

        The schema comes from the type hints; the description and per-argument
        descriptions from the docstring (Google style: a summary, then ``Args:``).
        """
        if fn is None:
            return lambda f: self.register(f, name=name, description=description, timeout=timeout)
        tool_name = name or fn.__name__
        if tool_name in self._tools:
            raise ValueError(f"a tool named {tool_name!r} is already registered")
        if not (description or inspect.getdoc(fn)):
            raise ValueError(f"tool {tool_name!r} needs a docstring or a description: the model reads it")
        is_async = inspect.iscoroutinefunction(fn)
        # LangChain builds the pydantic model from the signature and reads the
        # docstring's Args section into per-field descriptions.
        lc = StructuredTool.from_function(
            func=None if is_async else fn, coroutine=fn if is_async else None, name=tool_name,
            description=description, parse_docstring=True, error_on_invalid_docstring=False)
        model = lc.args_schema
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"could not build an argument model for {tool_name!r}")
        spec = convert_to_openai_tool(lc)["function"]
        tool = Tool(name=tool_name, description=spec.get("description") or "", fn=fn, args_model=model,
                    parameters=spec.get("parameters") or {"type": "object", "properties": {}},
                    timeout=self.default_timeout if timeout is None else timeout)
        self._tools[tool_name] = tool
        return fn

    def subset(self, names: Iterable[str]) -> "ToolRegistry":
        """A registry holding only ``names`` (same Tool objects)."""
        out = ToolRegistry(self.default_timeout)
        for n in names:
            out._tools[n] = self.get(n)
        return out

    # ---------------------------------------------------------------- lookup and export

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise KeyError(f"unknown tool {name!r}; registered: {', '.join(self._tools) or 'none'}") from None

    def _select(self, names: Sequence[str] | None) -> list[Tool]:
        return [self.get(n) for n in names] if names is not None else list(self._tools.values())

    def openai_tools(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Entries for the OpenAI ``tools=[...]`` parameter."""
        return [t.openai() for t in self._select(names)]

    def langchain_tools(self, names: Sequence[str] | None = None) -> list[StructuredTool]:
        """LangChain tools on the same schema and execution path as ``run``.

        Their ``args_schema`` is the JSON schema itself, so LangChain passes the
        raw arguments through and validation happens here, once, the same way
        for both front ends. A failed call raises ``ToolException`` internally,
        which LangChain turns into a ``ToolMessage`` with ``status="error"`` and
        our error text as content.
        """
        out = []
        for t in self._select(names):
            def sync(_name=t.name, **kwargs):
                return self._lc_content(self.run(_name, kwargs))

            async def asyn(_name=t.name, **kwargs):
                return self._lc_content(await self.arun(_name, kwargs))

            out.append(StructuredTool(name=t.name, description=t.description, args_schema=t.parameters,
                                      func=sync, coroutine=asyn, handle_tool_error=True))
        return out

    @staticmethod
    def _lc_content(result: ToolResult) -> str:
        if not result.ok:
            raise ToolException(result.content)
        return result.content

    # ---------------------------------------------------------------- validation

    def prepare(self, name: str, arguments: Any, tool_call_id: str = "") -> _Prepared:
        """Parse and validate one call's arguments; a failure is a finished ToolResult."""
        def fail(kind: str, text: str) -> _Prepared:
            return _Prepared(None, None, ToolResult(tool_call_id, name, f"Error: {text}", ok=False, error=kind))

        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return fail("unknown_tool", f"unknown tool '{name}'. Available tools: {known}.")
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, (str, bytes)):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError) as e:
                return fail("bad_json", f"the arguments for '{name}' are not valid JSON ({e}).")
        if not isinstance(arguments, Mapping):
            return fail("invalid_arguments", f"the arguments for '{name}' must be a JSON object.")
        fields = tool.args_model.model_fields
        unexpected = sorted(set(arguments) - set(fields))
        if unexpected:
            # pydantic would drop them silently; the model should learn the real names.
            return fail("invalid_arguments", f"invalid arguments for '{name}': unexpected argument(s) "
                        f"{', '.join(unexpected)}; expected {', '.join(fields) or 'none'}.")
        try:
            model = tool.args_model.model_validate(dict(arguments))
        except ValidationError as e:
            return fail("invalid_arguments", f"invalid arguments for '{name}': {format_validation_error(e)}.")
        return _Prepared(tool, {k: getattr(model, k) for k in fields}, None)

    # ---------------------------------------------------------------- execution

    def _done(self, tool: Tool, call_id: str, start: float, value: Any = None,
              exc: BaseException | None = None, timed_out: bool = False) -> ToolResult:
        seconds = time.monotonic() - start
        if timed_out:
            return ToolResult(call_id, tool.name, f"Error: tool '{tool.name}' timed out after {tool.timeout:g} s.",
                              ok=False, error="timeout", seconds=seconds)
        if exc is not None:
            msg = str(exc) or exc.__class__.__name__
            return ToolResult(call_id, tool.name, f"Error: tool '{tool.name}' failed: "
                              f"{exc.__class__.__name__}: {msg}", ok=False, error="exception", seconds=seconds)
        return ToolResult(call_id, tool.name, to_content(value), ok=True, seconds=seconds)

    def run(self, name: str, arguments: Any, tool_call_id: str = "") -> ToolResult:
        """Run one call synchronously under the tool's timeout. Never raises."""
        prep = self.prepare(name, arguments, tool_call_id)
        if prep.failed is not None:
            return prep.failed
        tool, kwargs = prep.tool, prep.kwargs
        start = time.monotonic()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                if tool.is_async:
                    # Its own loop, with the timeout inside so the coroutine is cancelled.
                    box["value"] = asyncio.run(asyncio.wait_for(tool.fn(**kwargs), tool.timeout))
                else:
                    box["value"] = tool.fn(**kwargs)
            except BaseException as e:  # noqa: BLE001 — a tool's failure is a result
                box["exc"] = e

        ctx = contextvars.copy_context()
        th = threading.Thread(target=ctx.run, args=(target,), daemon=True, name=f"tool-{name}")
        th.start()
        th.join(tool.timeout)
        async_timeout = tool.is_async and isinstance(box.get("exc"), (asyncio.TimeoutError, TimeoutError))
        if th.is_alive() or async_timeout:
            return self._done(tool, tool_call_id, start, timed_out=True)
        if "exc" in box:
            return self._done(tool, tool_call_id, start, exc=box["exc"])
        return self._done(tool, tool_call_id, start, value=box.get("value"))

    async def arun(self, name: str, arguments: Any, tool_call_id: str = "") -> ToolResult:
        """Run one call on the running event loop under the tool's timeout. Never raises
        (except the caller's own cancellation)."""
        prep = self.prepare(name, arguments, tool_call_id)
        if prep.failed is not None:
            return prep.failed
        tool, kwargs = prep.tool, prep.kwargs
        start = time.monotonic()
        try:
            if tool.is_async:
                value = await asyncio.wait_for(tool.fn(**kwargs), tool.timeout)
            else:
                value = await asyncio.wait_for(_in_daemon_thread(tool.fn, kwargs), tool.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return self._done(tool, tool_call_id, start, timed_out=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — a tool's failure is a result
            return self._done(tool, tool_call_id, start, exc=e)
        return self._done(tool, tool_call_id, start, value=value)

    async def aexecute(self, tool_calls: Sequence[Any]) -> list[ToolResult]:
        """Run one turn's tool calls concurrently; results in the calls' order."""
        normed = [normalize_call(c) for c in tool_calls]
        return list(await asyncio.gather(*(self.arun(n, a, i) for i, n, a in normed)))

    def execute(self, tool_calls: Sequence[Any]) -> list[ToolResult]:
        """Synchronous ``aexecute``: one thread per call, all started before any is awaited."""
        normed = [normalize_call(c) for c in tool_calls]
        if len(normed) == 1:
            i, n, a = normed[0]
            return [self.run(n, a, i)]
        results: list[ToolResult | None] = [None] * len(normed)

        def one(k: int, call_id: str, name: str, args: Any) -> None:
            results[k] = self.run(name, args, call_id)

        threads = [threading.Thread(target=contextvars.copy_context().run, args=(one, k, *c), daemon=True)
                   for k, c in enumerate(normed)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # each run() returns by its own timeout
        return [r for r in results if r is not None]


def _in_daemon_thread(fn: Callable[..., Any], kwargs: dict[str, Any]) -> asyncio.Future:
    """Run a sync function in a fresh daemon thread, as an awaitable.

    Not the loop's default executor: a tool that hangs past its timeout would
    keep one of that small pool's workers forever and starve later calls.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, payload: Any) -> None:
        if not fut.done():  # cancelled by the timeout: the late result is dropped
            fut.set_result(payload) if ok else fut.set_exception(payload)

    def target() -> None:
        try:
            value, ok = fn(**kwargs), True
        except BaseException as e:  # noqa: BLE001
            value, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop closed while the tool was still running
            pass

    ctx = contextvars.copy_context()
    threading.Thread(target=ctx.run, args=(target,), daemon=True, name=f"tool-{getattr(fn, '__name__', 'fn')}").start()
    return fut
