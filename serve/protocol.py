"""Chat-completion request checking, OpenAI/vLLM differences, and stream assembly.

The HTTP layer (serve/http/app.py) only converts; what a chat request means lives
here: which fields we accept, how `reasoning_effort` maps to the template's
thinking switch, how a vLLM response is made OpenAI-shaped, and how a stream
is assembled into the one response that the request log keeps.

Invariants:
- `prepare` never mutates the client's dict; the engine body it returns always
  asks for usage, so the log has token counts even when the client did not;
- a chunk leaves `fix_chunk` OpenAI-shaped: the gateway's id, `reasoning` and
  `reasoning_content` both set, and no usage unless the client asked for it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from agentloop.serve.errors import InvalidRequest
from agentloop.templates.reasoning import request_template_kwargs, thinking_enabled
from agentloop.templates.json_schema import bound_integers

ROLES = {"system", "developer", "user", "assistant", "tool"}
# Fields a client may not set through the gateway: the chat template is the
# one source of truth shared with training, and request ids are ours.
FORBIDDEN = {"chat_template", "request_id"}


class _Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: dict[str, Any]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Ours (extra_body): tokens of thinking before the engine closes it (see ThinkingBudgets).
    thinking_budget: StrictInt | None = Field(None, ge=0)


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")


def new_completion_id() -> tuple[str, str]:
    """(engine request id, completion id): vLLM names a response `chatcmpl-<request id>`."""
    rid = uuid.uuid4().hex
    return rid, f"chatcmpl-{rid}"


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object that everything downstream can handle
    (see `check_json_tree`); anything else is an InvalidRequest (400)."""
    try:
        # Python reads NaN, Infinity and 1e400, which are not JSON; the engine
        # client (orjson) would send them on as null, another request than the
        # one logged. Refused here, as a parse error.
        body = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.")
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}")
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    check_json_tree(body)
    return body


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond the range of a double (numbers must be finite)")
    return value


# Deepest nesting of arrays and objects a request body may have. json.loads
# stops at the interpreter's recursion limit (~1000 levels), but a body under
# it parses and then breaks the next code that walks it: the engine client's
# orjson stops at 255 levels (a 500), and vLLM's validation, the chat template
# and the grammar compiler all recurse too. Real requests (messages, tool
# schemas) are far shallower.
MAX_JSON_DEPTH = 100


def check_json_tree(body: Any) -> None:
    """Refuse (400) a parsed body that the rest of the way cannot carry: nested
    deeper than MAX_JSON_DEPTH (checked level by level, so a hostile body
    cannot make the check itself recurse), or holding what the engine client's
    encoder refuses -- a lone UTF-16 surrogate (JSON may escape one, "\\ud800";
    Python decodes it but cannot encode it as UTF-8 again, which the
    conversation hash and the log also need) or an integer beyond 64 bits."""
    level, depth = [body], 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")
        below: list[Any] = []
        for node in level:
            children = node.values() if type(node) is dict else node
            below += [v for v in children if type(v) in (dict, list)]
        level, depth = below, depth + 1
    try:
        orjson.dumps(body)  # the encoder the engine client (serve/engine/client.py) sends bodies with
    except TypeError as e:  # orjson.JSONEncodeError
        raise InvalidRequest(f"The request body holds a value that cannot be passed on: {e}.") from None


def validate(body: dict[str, Any]) -> ChatRequest:
    bad = FORBIDDEN & body.keys()
    if bad:
        name = sorted(bad)[0]
        raise InvalidRequest(f"The parameter `{name}` is not supported by this server.", param=name)
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _loc(err)
        raise InvalidRequest(f"Invalid value for '{loc}': {err['msg']}.", param=loc or None)
    for i, m in enumerate(req.messages):
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list role is unhashable: check the type first
            raise InvalidRequest(f"Invalid value for 'messages[{i}].role': {role!r}.", param=f"messages.[{i}].role")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise InvalidRequest(f"'messages[{i}]' of role 'tool' needs a string 'tool_call_id'.",
                                 param=f"messages.[{i}].tool_call_id")
        if role != "assistant" and m.get("content") is None:
            raise InvalidRequest(f"'messages[{i}].content' is required for role {role!r}.",
                                 param=f"messages.[{i}].content")
    names = [t.function.get("name") for t in req.tools or []]
    if any(not isinstance(n, str) or not n for n in names):
        raise InvalidRequest("Every tool needs a non-empty 'function.name'.", param="tools")
    tc = req.tool_choice
    if isinstance(tc, str):
        if tc not in {"none", "auto", "required"}:
            raise InvalidRequest(f"Invalid value for 'tool_choice': {tc!r}.", param="tool_choice")
        if tc == "required" and not names:
            raise InvalidRequest("'tool_choice' is 'required' but no 'tools' were given.", param="tool_choice")
    elif isinstance(tc, dict):
        fn = tc.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None  # "function": "f" is a 400, not a crash
        if tc.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequest("A named 'tool_choice' must be {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                                 param="tool_choice")
        if name not in names:
            raise InvalidRequest(f"'tool_choice' names the function {name!r}, which is not in 'tools'.",
                                 param="tool_choice")
    return req


@dataclass(frozen=True)
class ThinkingBudgets:
    """How long a thinking request may think before the engine writes the template's
    end of thinking and goes on to the answer (vLLM's per-request `thinking_token_budget`,
    enforced inside the engine). Built from Settings (thinking_budget,
    thinking_effort_budgets) for a template that has a thinking mode.

    A request's own `thinking_budget` (or vLLM's `thinking_token_budget`) is taken as
    sent; otherwise a thinking request gets its `reasoning_effort`'s budget or the
    default, capped at half its max_tokens so that an answer always has room."""

    default: int | None = 1024
    by_effort: Mapping[str, int] = field(default_factory=dict)
    enabled: bool = True  # False: the template has no thinking mode (the engine no reasoning config)

    def budget(self, body: Mapping[str, Any], req: ChatRequest, thinking: bool) -> int | None:
        if req.thinking_budget is not None or body.get("thinking_token_budget") is not None:
            if not self.enabled:
                param = "thinking_budget" if req.thinking_budget is not None else "thinking_token_budget"
                raise InvalidRequest("This model's chat template has no thinking mode.", param=param)
            return req.thinking_budget  # None: vLLM's own field goes through as sent
        if not thinking or not self.enabled:
            return None
        budget = self.by_effort.get(req.reasoning_effort or "", self.default)
        limit = _token_limit(req)
        if budget is not None and limit is not None:
            budget = min(budget, limit // 2)
        return budget


def prepare(body: dict[str, Any], req: ChatRequest, served_model: str,
            thinking: ThinkingBudgets | None = None) -> dict[str, Any]:
    """The body sent to the engine for a validated client body."""
    out = dict(body)
    out["model"] = served_model
    # reasoning_effort becomes the template's thinking switch, as training renders it.
    out["chat_template_kwargs"] = request_template_kwargs(body)
    out.pop("reasoning_effort", None)
    out.pop("thinking_budget", None)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict) and \
            isinstance(fmt["json_schema"].get("schema"), dict):
        # The grammar's copy only: an unbounded integer would let the model write digits for ever.
        out["response_format"] = {**fmt, "json_schema": {**fmt["json_schema"],
                                                         "schema": bound_integers(fmt["json_schema"]["schema"])}}
    budget = (thinking or ThinkingBudgets()).budget(
        body, req, thinking_enabled(out["chat_template_kwargs"]))
    if budget is not None:
        out["thinking_token_budget"] = budget
    if req.stream:
        opts = dict(req.stream_options or {})
        opts["include_usage"] = True
        out["stream_options"] = opts
    return out


def _fix_message(m: dict[str, Any] | None) -> None:
    if not m:
        return
    r = m.get("reasoning")
    if r is None:
        r = m.get("reasoning_content")
    if r is not None or "reasoning" in m or "reasoning_content" in m:
        m["reasoning"] = r
        m["reasoning_content"] = r


def _token_limit(req: ChatRequest) -> int | None:
    return req.max_completion_tokens or req.max_tokens


def _forced(req: ChatRequest) -> bool:
    return req.tool_choice == "required" or isinstance(req.tool_choice, dict)


def cut_finish(finish: str | None, completion_tokens: Any, req: ChatRequest) -> str | None:
    """vLLM reports "tool_calls" whenever a call was returned, even when the
    token cap cut the output after it (the later, cut-off calls are dropped by
    our parser). The client must learn that the turn is incomplete, so a
    single-choice answer that used its whole cap is "length", as OpenAI does.
    (With n > 1 usage is summed over choices, so it cannot tell which was cut.)"""
    limit = _token_limit(req)
    if (finish == "tool_calls" and req.n == 1 and limit is not None
            and isinstance(completion_tokens, int) and completion_tokens >= limit):
        return "length"
    return finish


def fix_response(resp: dict[str, Any], completion_id: str, req: ChatRequest | None = None) -> dict[str, Any]:
    resp["id"] = completion_id
    used = (resp.get("usage") or {}).get("completion_tokens")
    for ch in resp.get("choices") or []:
        m = ch.get("message")
        _fix_message(m)
        if req is None:
            continue
        # vLLM's forced path writes content "" where OpenAI sends null.
        if m and m.get("content") == "" and (m.get("tool_calls") or _forced(req)):
            m["content"] = None
        ch["finish_reason"] = cut_finish(ch.get("finish_reason"), used, req)
    return resp


class FinishFixer:
    """Holds back the chunk that carries a "tool_calls" finish until the usage
    chunk that follows it (the gateway always asks the engine for usage), so
    `cut_finish` can correct it; everything else passes straight through."""

    def __init__(self, req: ChatRequest):
        self.req = req
        self.held: dict[str, Any] | None = None
        self.active = req.n == 1 and _token_limit(req) is not None

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.active:
            return [chunk]
        if self.held is not None:
            held, self.held = self.held, None
            used = (chunk.get("usage") or {}).get("completion_tokens")
            for ch in held.get("choices") or []:
                ch["finish_reason"] = cut_finish(ch.get("finish_reason"), used, self.req)
            return [held, chunk]
        if any(ch.get("finish_reason") == "tool_calls" for ch in chunk.get("choices") or []):
            self.held = chunk
            return []
        return [chunk]

    def flush(self) -> list[dict[str, Any]]:
        held, self.held = self.held, None
        return [held] if held is not None else []


def fix_chunk(chunk: dict[str, Any], completion_id: str, client_wants_usage: bool) -> dict[str, Any] | None:
    """Make one engine chunk OpenAI-shaped; None if the client should not see it."""
    chunk["id"] = completion_id
    if not client_wants_usage:
        if not chunk.get("choices") and chunk.get("usage") is not None:
            return None  # the usage-only chunk we asked for on our own
        chunk.pop("usage", None)
    for ch in chunk.get("choices") or []:
        _fix_message(ch.get("delta"))
    return chunk


class StreamAssembler:
    """Folds stream chunks into the `chat.completion` object a non-stream call returns."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.meta:
            self.meta = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for ch in chunk.get("choices") or []:
            c = self.choices.setdefault(ch.get("index", 0), {
                "content": None, "reasoning": None, "tool_calls": {}, "finish_reason": None, "role": "assistant"})
            d = ch.get("delta") or {}
            for key in ("content", "reasoning"):
                if d.get(key):
                    c[key] = (c[key] or "") + d[key]
            for tc in d.get("tool_calls") or []:
                slot = c["tool_calls"].setdefault(tc.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]
            if ch.get("finish_reason"):
                c["finish_reason"] = ch["finish_reason"]

    def result(self) -> dict[str, Any]:
        choices = []
        for idx in sorted(self.choices):
            c = self.choices[idx]
            msg: dict[str, Any] = {"role": "assistant", "content": c["content"],
                                   "reasoning": c["reasoning"], "reasoning_content": c["reasoning"]}
            if c["tool_calls"]:
                msg["tool_calls"] = [c["tool_calls"][i] for i in sorted(c["tool_calls"])]
            choices.append({"index": idx, "message": msg, "finish_reason": c["finish_reason"]})
        return {**self.meta, "object": "chat.completion", "choices": choices, "usage": self.usage}


def finish_reason(resp: dict[str, Any] | None) -> str | None:
    reasons = [c.get("finish_reason") for c in (resp or {}).get("choices") or [] if c.get("finish_reason")]
    return ",".join(dict.fromkeys(reasons)) or None
