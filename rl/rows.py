"""One training row's pieces from logged records: the prompt as served, an answer as a training
assistant message, the split bucket, lengths, KTO class weights.

Shared by rl/datasets.py (rows from feedback) and rl/graded.py's callers (rows from grades), so
both render a prompt exactly as the gateway did and compare answers the same way.

Invariants: pure functions; never imports fastapi, torch or datasets.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from agentloop.rl.schema import conversation_hash
from agentloop.templates.reasoning import request_template_kwargs

# TRL wants desirable_weight*n_desirable / (undesirable_weight*n_undesirable) in
# [1, 4/3]; aim at the middle so its 2-decimal rounded bound check passes too.
_KTO_TARGET_RATIO = 7 / 6


def template_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    """The chat-template kwargs the gateway rendered ``request`` with: the same function
    serving uses (agentloop.templates.reasoning), so training can never drift from it."""
    return request_template_kwargs(request)


def assistant_message(message: dict[str, Any] | None) -> dict[str, Any] | None:
    """A response (or correction) message as a training assistant message; None if empty."""
    if not isinstance(message, dict):
        return None
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")  # vLLM's name; the gateway sets both
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    calls = []
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function") or {}
        args = fn.get("arguments")
        call = {"type": "function", "function": {
            "name": fn.get("name"),
            # Chat templates and OpenAI both expect the arguments as a JSON string.
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}
        if tc.get("id") is not None:
            call = {"id": tc["id"], **call}
        calls.append(call)
    if calls:
        out["tool_calls"] = calls
    if out["content"] is None and not calls:
        return None
    return out


def choice_message(completion: dict[str, Any], index: int) -> dict[str, Any] | None:
    for ch in (completion.get("response") or {}).get("choices") or []:
        if isinstance(ch, dict) and ch.get("index", 0) == index:
            return assistant_message(ch.get("message"))
    return None


def prompt_of(completion: dict[str, Any]) -> dict[str, Any]:
    req = completion["request"]
    return {"prompt": req["messages"], "tools": req.get("tools") or None,
            "chat_template_kwargs": template_kwargs(req),
            "conversation_hash": completion.get("conversation_hash") or conversation_hash(req)}


def group_key(caller: str, p: dict[str, Any]) -> tuple[str, str, str]:
    """One caller's conversation as rendered (`prompt_of`): the answers graded against each other."""
    return caller, p["conversation_hash"], canon(p["chat_template_kwargs"])


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def bucket(conversation_hash: str, salt: str) -> int:
    return int(hashlib.sha256(f"{salt}:{conversation_hash}".encode()).hexdigest()[:8], 16) % 100


def is_positive(row: dict[str, Any]) -> bool:
    """A DPO row with no preference in it (chosen == rejected): only an NLL term learns from it."""
    return "chosen" in row and canon(row["chosen"]) == canon(row.get("rejected"))


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) so that TRL's balance guidance holds.

    Only the over-represented class's opposite is reweighted (TRL: adjust one,
    not both); balanced enough data, or a missing class, keeps (1.0, 1.0).
    """
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if 1 <= ratio <= 4 / 3:
        return 1.0, 1.0
    if ratio > 4 / 3:
        return 1.0, round(ratio / _KTO_TARGET_RATIO, 4)
    return round(_KTO_TARGET_RATIO / ratio, 4), 1.0


def char_length(messages: list[dict[str, Any]], tools: list | None, _kwargs: dict[str, Any]) -> int:
    """Cheap token estimate: characters/4 of the messages and tools as JSON."""
    return math.ceil(len(json.dumps({"tools": tools, "messages": messages}, ensure_ascii=False)) / 4)


def tokenizer_length(tokenizer: Any):
    """A length function counting the tokens of the rendered chat with ``tokenizer``."""
    def length(messages: list[dict[str, Any]], tools: list | None, kwargs: dict[str, Any]) -> int:
        ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return len(ids)
    return length
