"""vLLM parsers for the agentloop chat templates, and the plugin that registers them.

Owns: the `agentloop_hermes` / `agentloop_llama3_json` tool parsers and the
`agentloop_think` reasoning parser -- thin adapters from vLLM 0.32's legacy
`ToolParser` / `ReasoningParser` interfaces onto the text state machines of
`agentloop.templates.parsing` -- and `register()`, the `vllm.general_plugins` entry
point. Only ever imported inside a vLLM process.

Invariant: the adapters never parse on their own, so a streamed response
assembles to what the non-streaming path returns for the same output: content
free of call markup, each call once with an `id`, `type`, its full `name`,
its `index` and its whole arguments in its first delta. Markers are matched as
text (in SmolLM2 `<tool_call>` and `</think>` are 3-5 tokens each); token ids
are only used by the cheap checks vLLM makes on ids: the end of a turn (to
flush what was held back) and the end of reasoning (the structured-output
gate), which decodes only a small tail window.

How vLLM drives them (vllm/parser/abstract_parser.py, DelegatingParser):
- `is_reasoning_end(prompt_ids)` decides whether the reasoning phase exists.
  It is True unless the prompt ends inside an open `<think>` (thinking on),
  so with thinking off a forced tool_choice / JSON schema constrains the very
  first generated token.
- While reasoning, `extract_reasoning_streaming` then
  `is_reasoning_end_streaming` run per delta; the frontend instance answers
  the latter from its own splitter, so the content it hands to the tool phase
  is exactly what the splitter released after `</think>` and its newlines.
  The engine-side instance (structured-output gate) never extracts and only
  checks whether `</think>` completed within the delta tokens.
- With thinking off, a leading `<think>` block the model writes anyway is
  split off by the tool parser in streaming and by `extract_reasoning` in
  non-streaming, under the same condition (tools given, tool_choice auto).

Constrained calls (agentloop_hermes): vLLM builds an xgrammar structural tag
from the tools (`structural_tag_model = "hermes"`, every tool's arguments
pinned to its schema) before our `adjust_request` runs; we then
- reject, as a 400 (`VLLMValidationError`), a tool whose parameters are not an
  object schema or that xgrammar cannot compile, naming the tool -- instead of
  the engine's opaque fallback error;
- make each tool's arguments grammar an object (a missing/empty schema would
  let `"arguments": 5` through, which is no call) whose required keys are all
  writable, written in the template's JSON style (", " and ": ") with no
  other whitespace between tokens (free whitespace lets a small model fill
  `max_tokens` with newlines inside a call), and keep a stray `</tool_call>`
  out of auto-mode text.
Only the grammar changes; the prompt already shows the tools as sent.
Because the grammar cannot leave a `<tool_call>` open except by being cut
off (max_tokens, a stop string), an unclosed block is dropped in both
streaming and non-streaming -- never a half call, never markup as content --
and a forced call (required/named, no text allowed around calls) returns no
content at all: a cut forced call is finish_reason "length", no tool_calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from vllm import envs
from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.logger import init_logger
from vllm.reasoning import ReasoningParser, ReasoningParserManager
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tool_parsers import ToolParser, ToolParserManager
from vllm.tool_parsers.tool_strict_level import ToolStrictLevel

# The engine's environment has agentloop installed (these parsers are its entry points),
# also when vLLM loads this file by path (--tool-parser-plugin).
from agentloop.serve.inside_vllm.call_grammar import check_tool_schemas, constrain_call_tag
from agentloop.templates import parsing

logger = init_logger(__name__)

__all__ = [
    "AgentloopHermesToolParser",
    "AgentloopLlama3JsonToolParser",
    "AgentloopThinkReasoningParser",
    "register",
]

# Tokens that end an assistant turn in the supported formats. Their id is the
# last of the final delta's ids (vLLM keeps the stop token id, not its text):
# the only "stream is over" signal a legacy parser gets, used to flush text
# held back as a possible tag.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
# Tokens that start a turn: nothing before them belongs to the current one.
_TURN_START = ("<|im_start|>", "<|start_header_id|>")


def _token_ids(tokenizer: Any, vocab: dict[str, int], tokens: Iterable[str]) -> frozenset[int]:
    ids = {vocab[t] for t in tokens if t in vocab}
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return frozenset(ids)


def _message(content: str = "", reasoning: str = "", tool_calls: list[DeltaToolCall] | None = None) -> DeltaMessage | None:
    """A delta with only the fields that carry something: vLLM serialises set fields
    (`exclude_unset`), so an explicit None would go out as `"content": null`."""
    fields: dict[str, Any] = {}
    if content:
        fields["content"] = content
    if reasoning:
        fields["reasoning"] = reasoning
    if tool_calls:
        fields["tool_calls"] = tool_calls
    return DeltaMessage(**fields) if fields else None


def _request_thinking(request: Any) -> bool:
    """Thinking as this request asked for it (server defaults are not visible here)."""
    kwargs = dict(getattr(request, "chat_template_kwargs", None) or {})
    effort = getattr(request, "reasoning_effort", None)
    if effort is not None:
        kwargs.setdefault("reasoning_effort", effort)
    return parsing.thinking_enabled(kwargs)


def _auto_tools(request: Any) -> bool:
    """Whether vLLM runs the tool parser over this request's output (auto tool choice)."""
    return bool(getattr(request, "tools", None)) and getattr(request, "tool_choice", None) in (None, "auto")


def _forced(request: Any) -> bool:
    """tool_choice "required" or a named function: the output must be calls."""
    choice = getattr(request, "tool_choice", None)
    return choice == "required" or (choice is not None and not isinstance(choice, str))


def dedupe_tool_calls() -> bool:
    """AGENTLOOP_DEDUPE_TOOL_CALLS (default on): drop a call that repeats one
    already made in the same answer (see `parsing.ToolCallStreamParser`)."""
    return os.environ.get("AGENTLOOP_DEDUPE_TOOL_CALLS", "1").strip().lower() not in ("0", "false", "no", "off")


class _AgentloopToolParser(ToolParser):
    """Shared adapter: one pure `parsing.ToolCallStreamParser` per request."""

    parser_cls: type[parsing.ToolCallStreamParser]
    parser_options: dict[str, Any] = {}
    markers: tuple[str, ...] = ()
    # Set True by vLLM's Parser when no reasoning parser is configured: then
    # reasoning markup is plain content and nothing here splits it off.
    skip_reasoning_parsing: bool = False

    def _options(self) -> dict[str, Any]:
        return {**self.parser_options, "dedupe": dedupe_tool_calls()}

    def __init__(self, tokenizer: Any, tools: list | None = None):
        super().__init__(tokenizer, tools)
        self._end_ids = _token_ids(tokenizer, self.vocab, _END_OF_TURN)
        # If a marker is a single (possibly special) token it must not be
        # skipped by the detokenizer, or the text parser would never see it.
        self._markers_are_tokens = any(m in self.vocab for m in self.markers)
        self._stream: parsing.ToolCallStreamParser | None = None
        self._think: parsing.ThinkStreamSplitter | None = None
        self._no_content = False

    def adjust_request(self, request: Any) -> Any:
        request = super().adjust_request(request)
        if request.tools and request.tool_choice != "none" and self._markers_are_tokens:
            request.skip_special_tokens = False
        return request

    def _constrained_forced(self, request: Any) -> bool:
        """A forced call decoded under our structural tag: vLLM hands such
        requests to this parser only when the tag replaced its JSON-list
        format, and the tag allows no text outside the calls -- so any text
        there is a fragment of call markup cut off by the end of the output."""
        return not self.supports_required_and_named and _forced(request)

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        content, calls = self.parser_cls.extract(model_output, **self._options())
        if self._constrained_forced(request):
            content = ""
        if not calls:
            if content == model_output:
                return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
            # A cut-off call was dropped (or forced-call fragments blanked).
            # vLLM keeps the raw output as content when tools_called is False,
            # so report "called" with no calls: it then takes our content and
            # still finds no call (finish_reason stays the engine's).
            return ExtractedToolCallInformation(tools_called=True, tool_calls=[], content=content or None)
        return ExtractedToolCallInformation(
            tools_called=True,
            tool_calls=[
                ToolCall(id=make_tool_call_id(), type="function",
                         function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in calls
            ],
            content=content or None,
        )

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        try:
            if self._stream is None:
                self._stream = self.parser_cls(**self._options())
                self._no_content = self._constrained_forced(request)
                if not self.skip_reasoning_parsing and not _request_thinking(request) and _auto_tools(request):
                    self._think = parsing.ThinkStreamSplitter(thinking=False)
            ended = self._turn_ended(delta_token_ids, request)
            reasoning, text = "", delta_text
            if self._think is not None:
                reasoning, text = self._think.feed(delta_text)
                if ended:
                    r, t = self._think.finish()
                    reasoning, text = reasoning + r, text + t
            events = self._stream.feed(text)
            if ended:
                events += self._stream.finish()
            return self._delta(events, reasoning)
        except Exception:
            # Never fail the whole stream over one delta: pass it on as text.
            logger.exception("agentloop tool parser failed on a delta; passing it through as content")
            return _message(delta_text)

    def _turn_ended(self, delta_token_ids: Sequence[int], request: Any) -> bool:
        if not delta_token_ids:
            return False
        last = delta_token_ids[-1]
        if last in (getattr(request, "stop_token_ids", None) or ()):
            return True
        return last in self._end_ids and not getattr(request, "ignore_eos", False)

    def _delta(self, events: list[parsing.Event], reasoning: str) -> DeltaMessage | None:
        content = "" if self._no_content else "".join(e.text for e in events if isinstance(e, parsing.TextDelta))
        names: dict[int, str] = {}
        args: dict[int, str] = {}
        for e in events:
            if isinstance(e, parsing.ToolCallStart):
                names[e.index] = e.name
            elif isinstance(e, parsing.ToolCallArgs):
                args[e.index] = args.get(e.index, "") + e.text
        calls: list[DeltaToolCall] = []
        for index in sorted(set(names) | set(args)):
            fragment = args.get(index, "")
            if index in names:
                calls.append(DeltaToolCall(
                    index=index, id=make_tool_call_id(), type="function",
                    function=DeltaFunctionCall(name=names[index], arguments=fragment),
                ))
                # Keep vLLM's bookkeeping equal to what was streamed, so its
                # end-of-stream "remaining arguments" top-up adds nothing.
                self.prev_tool_call_arr.append({"name": names[index], "arguments": ""})
                self.streamed_args_for_tool.append("")
                self.current_tool_id, self.current_tool_name_sent = index, True
            else:
                calls.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=fragment)))
            self.prev_tool_call_arr[index]["arguments"] += fragment
            self.streamed_args_for_tool[index] += fragment
        return _message(content, reasoning, calls)


class AgentloopHermesToolParser(_AgentloopToolParser):
    """`<tool_call>` JSON blocks, as written by the chatml-tools template."""

    # vLLM's "hermes" structural tag is exactly our block format, so the
    # engine's xgrammar backend can constrain a whole call: the name to the
    # offered tools and the arguments to that tool's JSON schema. PARAMETER
    # strictness pins argument schemas for every tool (as if `strict: true`),
    # for forced calls and, once the model opens `<tool_call>`, for auto ones.
    # With a structural tag vLLM also stops forcing its own JSON-list format
    # for required/named tool_choice and reads the calls with this parser.
    structural_tag_model = "hermes"
    default_tool_strict_level = ToolStrictLevel.PARAMETER

    parser_cls = parsing.HermesToolParser
    # Under the tag an open block at the end can only be a cut-off call (see
    # the module doc); without it (VLLM_ENFORCE_STRICT_TOOL_CALLING=0) it is a
    # call the model broke off -- dropped all the same, so markup never
    # becomes content and streaming still equals non-streaming.
    parser_options = {"drop_unclosed": True}
    markers = (parsing.HermesToolParser.OPEN, parsing.HermesToolParser.CLOSE,
               parsing.ThinkStreamSplitter.OPEN, parsing.ThinkStreamSplitter.CLOSE)

    def adjust_request(self, request: Any) -> Any:
        """Runs after vLLM put its tool-call tag into `structured_outputs`."""
        request = super().adjust_request(request)
        params = getattr(request, "structured_outputs", None)
        tag = getattr(params, "structural_tag", None)
        if (request.tools and request.tool_choice != "none" and tag and self.structural_tag_model
                and envs.VLLM_ENFORCE_STRICT_TOOL_CALLING):
            check_tool_schemas(request.tools)
            params.structural_tag = constrain_call_tag(tag, parsing.HermesToolParser.OPEN,
                                                       parsing.HermesToolParser.CLOSE)
        return request


class AgentloopLlama3JsonToolParser(_AgentloopToolParser):
    """Bare `{"name", "parameters"}` objects, as written by the llama3-json template."""

    parser_cls = parsing.Llama3JsonToolParser
    markers = (parsing.Llama3JsonToolParser.TAG,)


class AgentloopThinkReasoningParser(ReasoningParser):
    """`<think>...</think>` reasoning for the chatml-tools template, matched as text.

    The thinking switch comes from `chat_template_kwargs` (enable_thinking /
    reasoning_effort, as the template reads them), which vLLM passes to the
    frontend and to the engine-side instance alike.
    """

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any):
        super().__init__(tokenizer, *args, **kwargs)
        self.thinking = parsing.thinking_enabled(kwargs.get("chat_template_kwargs") or {})
        vocab = self.vocab
        self._end_ids = _token_ids(tokenizer, vocab, _END_OF_TURN)
        self._turn_start_ids = frozenset(vocab[t] for t in _TURN_START if t in vocab)
        self._stream_thinking = self.thinking
        self._splitter: parsing.ThinkStreamSplitter | None = None

    @property
    def reasoning_start_str(self) -> str:
        return parsing.ThinkStreamSplitter.OPEN

    @property
    def reasoning_end_str(self) -> str:
        return parsing.ThinkStreamSplitter.CLOSE

    def _decode(self, ids: Sequence[int]) -> str:
        return self.model_tokenizer.decode(list(ids), skip_special_tokens=False)

    def adjust_request(self, request: Any) -> Any:
        vocab = self.vocab
        if any(t in vocab for t in (parsing.ThinkStreamSplitter.OPEN, parsing.ThinkStreamSplitter.CLOSE)):
            request.skip_special_tokens = False  # single-token tags must reach the text
        return request

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """False iff the sequence ends inside an open `<think>` block.

        Only the current turn is decoded (back to the last turn-start token).
        A sequence with no turn start is generated output, whose opener -- in
        thinking mode -- was in the prompt.
        """
        start, opened = 0, self.thinking
        for i in range(len(input_ids) - 1, -1, -1):
            if input_ids[i] in self._turn_start_ids:
                start, opened = i, False
                break
        text = ("<think>\n" if opened else "") + self._decode(input_ids[start:])
        open_at = text.rfind(parsing.ThinkStreamSplitter.OPEN)
        return open_at < 0 or text.rfind(parsing.ThinkStreamSplitter.CLOSE) > open_at

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
        if self._splitter is not None:
            # Frontend: the splitter that classified the text decides, so the
            # hand-over to the tool phase happens exactly when it releases content.
            return self._splitter.content_started
        # Engine (structured-output gate): did `</think>` complete within the
        # delta? Decode only the delta plus enough tokens before it to hold the tag.
        n = len(list(delta_ids))
        if n == 0:
            return False
        close = parsing.ThinkStreamSplitter.CLOSE
        window = list(input_ids[-(n + len(close)):])
        return self._decode(window).count(close) > self._decode(window[:-n]).count(close)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        """The ids after the token that completes `</think>`."""
        ids = list(input_ids)
        close = parsing.ThinkStreamSplitter.CLOSE
        if close not in self._decode(ids):
            # At the hand-over the tag may have arrived in an earlier delta: the
            # whole delta is content then. Elsewhere no tag means all reasoning
            # in thinking mode, all content otherwise.
            return ids if self._splitter is not None or not self.thinking else []
        lo, hi = 1, len(ids)
        while lo < hi:  # shortest prefix containing the tag
            mid = (lo + hi) // 2
            if close in self._decode(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return ids[lo:]

    def adjust_initial_state_from_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        # Called only when is_reasoning_end(prompt) is False: the prompt left a
        # <think> open (thinking on, or an assistant prefill that opened one).
        self._stream_thinking = True

    def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
        if not self.thinking and not _auto_tools(request):
            # Thinking off and no tool parsing: streaming passes the text through
            # untouched, so the non-streaming result must too.
            return None, model_output
        reasoning, content = parsing.split_reasoning(model_output, self.thinking)
        return reasoning, content or None

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> DeltaMessage | None:
        if self._splitter is None:
            self._splitter = parsing.ThinkStreamSplitter(self._stream_thinking)
        reasoning, content = self._splitter.feed(delta_text)
        if delta_token_ids and delta_token_ids[-1] in self._end_ids:
            r, c = self._splitter.finish()
            reasoning, content = reasoning + r, content + c
        return _message(content, reasoning)


_TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "agentloop_hermes": AgentloopHermesToolParser,
    "agentloop_llama3_json": AgentloopLlama3JsonToolParser,
}
_REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "agentloop_think": AgentloopThinkReasoningParser,
}


def register() -> None:
    """Register the parsers by name. Idempotent and cheap (dictionary writes)."""
    for name, cls in _TOOL_PARSERS.items():
        ToolParserManager.register_module(name=name, module=cls, force=True)
    for name, cls in _REASONING_PARSERS.items():
        ReasoningParserManager.register_module(name=name, module=cls, force=True)


# `--tool-parser-plugin` / `--reasoning-parser-plugin` only import this file.
register()
