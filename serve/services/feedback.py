"""User feedback on logged chat completions: ``POST /v1/feedback`` and ``GET /v1/feedback``.

What it owns: what a feedback request means and which ones are accepted. The
routes (serve/http/feedback.py) are thin; the rules are plain functions (``parse_feedback``,
``record_feedback``, ``parse_list_query``) so they can be used and tested
without HTTP; the SQL is in the store (serve/store/feedback.py).

Feedback types (every body may add ``"comment"``, a string):
- ``thumbs``: ``{"completion_id", "value": 1 | -1}``
- ``rating``: ``{"completion_id", "value": 1..5}``
- ``correction``: ``{"completion_id", "correction": <assistant message>}``
- ``reference``: ``{"completion_id", "reference": <assistant message>}`` — like a correction
  in shape, but it means "grade against this" (rl/graders: the reference-call and string
  graders compare the answer with it), not "train on this verbatim".
- ``pairwise``: ``{"chosen_id", "rejected_id", "chosen_index"?, "rejected_index"?}``
  — two choices of the same conversation (same ``conversation_hash``): two
  completions (a regenerate), or two choices of one ``n>1`` completion.
Thumbs, ratings, corrections and references refer to choice 0 of their completion.

Invariants
- A 200 means the feedback is committed (inserted synchronously, off the event
  loop, in its own transaction) — never queued.
- A caller only ever sees or references their own completions and feedback;
  someone else's completion id answers exactly like an unknown one (404).
- With an ``Idempotency-Key``, one (caller, key) stores at most one row: a retry
  of the same body gets the first response back, another body gets a 409.
- Everything a client can send yields a 200 or an OpenAI-shaped 4xx, never a 500.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from typing import Any, Callable, Mapping

from agentloop.rl.schema import FEEDBACK_TYPES
from agentloop.serve.errors import AgentloopError, InvalidRequest, NotFound

MAX_BODY_BYTES = 1_000_000  # a correction can be long, but not unbounded
MAX_COMMENT_CHARS = 4_000
MAX_ID_CHARS = 200
MAX_KEY_CHARS = 255
MAX_CHOICE_INDEX = 15  # chat requests allow n <= 16
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1_000

# Keys each type accepts. Unknown keys are refused, as OpenAI does, so a typo
# (say "score" for "value") is an error instead of silently stored feedback.
_FIELDS = {
    "thumbs": {"completion_id", "value"},
    "rating": {"completion_id", "value"},
    "correction": {"completion_id", "correction"},
    "reference": {"completion_id", "reference"},
    "pairwise": {"chosen_id", "rejected_id", "chosen_index", "rejected_index"},
}
_COMMON = {"type", "comment"}
# The stored fields a client sees; caller, key and request hash stay internal.
PUBLIC_FIELDS = ("type", "completion_id", "chosen_id", "rejected_id", "chosen_index", "rejected_index",
                 "value", "correction", "reference", "comment", "version", "conversation_hash")


class IdempotencyKeyReused(AgentloopError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"


# ---------------------------------------------------------------- validation (pure)

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not count as 1


def _id(body: Mapping[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v or len(v) > MAX_ID_CHARS:
        raise InvalidRequest(f"'{key}' must be a completion id (a non-empty string).", param=key)
    return v


def check_assistant_message(msg: Any, param: str = "correction") -> dict[str, Any]:
    """Validate an assistant message and return it normalised for training.

    ``content`` is a string or null; ``tool_calls`` (optional) each name a
    function and carry ``arguments`` as a JSON-parseable string, as OpenAI sends
    them; ``reasoning_content`` (or its alias ``reasoning``) is optional. A
    message with neither content nor tool calls is refused: it teaches nothing.
    """
    if not isinstance(msg, dict):
        raise InvalidRequest(f"'{param}' must be an assistant message object.", param=param)
    unknown = msg.keys() - {"role", "content", "tool_calls", "reasoning_content", "reasoning"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unrecognized field in '{param}': '{name}'.", param=f"{param}.{name}")
    if msg.get("role") != "assistant":
        raise InvalidRequest(f"'{param}.role' must be 'assistant'.", param=f"{param}.role")
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        raise InvalidRequest(f"'{param}.content' must be a string or null.", param=f"{param}.content")
    out: dict[str, Any] = {"role": "assistant", "content": content}
    r, rc = msg.get("reasoning"), msg.get("reasoning_content")
    if r is not None and rc is not None and r != rc:
        raise InvalidRequest(f"'{param}.reasoning' and '{param}.reasoning_content' differ.",
                             param=f"{param}.reasoning_content")
    reasoning = rc if rc is not None else r
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise InvalidRequest(f"'{param}.reasoning_content' must be a string.", param=f"{param}.reasoning_content")
        out["reasoning_content"] = reasoning
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise InvalidRequest(f"'{param}.tool_calls' must be a list.", param=f"{param}.tool_calls")
        norm = []
        for i, tc in enumerate(calls):
            p = f"{param}.tool_calls[{i}]"
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or tc.get("type", "function") != "function":
                raise InvalidRequest(f"'{p}' must be {{\"type\": \"function\", \"function\": {{...}}}}.", param=p)
            name, args = fn.get("name"), fn.get("arguments")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"'{p}.function.name' must be a non-empty string.", param=f"{p}.function.name")
            try:
                if not isinstance(args, str):
                    raise TypeError
                json.loads(args)
            except (TypeError, ValueError, RecursionError):
                raise InvalidRequest(f"'{p}.function.arguments' must be a string holding valid JSON.",
                                     param=f"{p}.function.arguments") from None
            call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
            if tc.get("id") is not None:
                if not isinstance(tc["id"], str):
                    raise InvalidRequest(f"'{p}.id' must be a string.", param=f"{p}.id")
                call = {"id": tc["id"], **call}
            norm.append(call)
        if norm:
            out["tool_calls"] = norm
    if content is None and "tool_calls" not in out:
        raise InvalidRequest(f"'{param}' needs 'content' or 'tool_calls'.", param=f"{param}.content")
    return out


def parse_feedback(body: Any) -> dict[str, Any]:
    """Check a feedback body's shape; return the feedback row fields it sets.

    Pure: it checks what can be checked without the store (types, ranges, the
    correction message, pairwise sides differing). Raises InvalidRequest.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    ftype = body.get("type")
    if ftype not in FEEDBACK_TYPES:
        raise InvalidRequest(f"'type' must be one of {', '.join(FEEDBACK_TYPES)}; got {ftype!r}.", param="type")
    unknown = body.keys() - _FIELDS[ftype] - _COMMON
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unrecognized request argument supplied for '{ftype}' feedback: {name}.", param=name)
    out: dict[str, Any] = {"type": ftype}
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise InvalidRequest(f"'comment' must be a string of at most {MAX_COMMENT_CHARS} characters.",
                             param="comment")
    out["comment"] = comment
    if ftype == "pairwise":
        out["chosen_id"], out["rejected_id"] = _id(body, "chosen_id"), _id(body, "rejected_id")
        for key in ("chosen_index", "rejected_index"):
            v = body.get(key)
            if v is not None and not (_is_int(v) and 0 <= v <= MAX_CHOICE_INDEX):
                raise InvalidRequest(f"'{key}' must be an integer choice index in 0..{MAX_CHOICE_INDEX}.", param=key)
            out[key] = v
        if (out["chosen_id"], out["chosen_index"] or 0) == (out["rejected_id"], out["rejected_index"] or 0):
            raise InvalidRequest("'chosen' and 'rejected' are the same choice; a pairwise preference needs two.",
                                 param="rejected_id")
        return out
    out["completion_id"] = _id(body, "completion_id")
    if ftype in ("correction", "reference"):
        out[ftype] = check_assistant_message(body.get(ftype), param=ftype)
        return out
    v = body.get("value")
    ok = _is_int(v) and (v in (1, -1) if ftype == "thumbs" else 1 <= v <= 5)
    if not ok:
        allowed = "1 or -1" if ftype == "thumbs" else "an integer from 1 to 5"
        raise InvalidRequest(f"'value' of '{ftype}' feedback must be {allowed}; got {v!r}.", param="value")
    out["value"] = v
    return out


def request_hash(body: Any) -> str:
    """Hash of a body's meaning (key order and whitespace do not matter)."""
    try:
        canon = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (RecursionError, ValueError):  # nesting that parsed on the loop but not here
        raise InvalidRequest("The request body is nested too deeply.") from None
    return hashlib.sha256(canon.encode()).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"The Idempotency-Key header must be 1..{MAX_KEY_CHARS} characters.",
                             param="Idempotency-Key")
    return key


# ---------------------------------------------------------------- recording (sync, blocking)

def completions_by_id(store, flush: Callable[[], Any] | None, ids: list[str]) -> dict[str, dict | None]:
    """The logged completions `ids` (None where missing), the request log flushed once first if
    one is not written yet (also serve/services/grading.py). Any caller's: ownership is the caller's."""
    found = {i: store.get_completion(i) for i in dict.fromkeys(ids)}
    if flush is not None and any(v is None for v in found.values()):
        # The gateway logs completions off the response path: a client quick to
        # send feedback can beat its completion to the table. Wait for the queue.
        flush()
        found = {i: v if v is not None else store.get_completion(i) for i, v in found.items()}
    return found


def _usable(comp: dict | None, caller: str, cid: str, param: str, index: int) -> dict:
    # Someone else's completion answers exactly like a missing one: a distinct
    # answer would let a caller probe which ids exist.
    if comp is None or comp["caller"] != caller:
        raise NotFound(f"No completion found with id '{cid}'.", param=param, code="completion_not_found")
    if comp["status_code"] != 200:
        raise InvalidRequest(f"Completion '{cid}' did not succeed (status {comp['status_code']}); "
                             "only successful completions take feedback.", param=param,
                             code="completion_not_successful")
    choices = (comp.get("response") or {}).get("choices") or []
    if not any(isinstance(c, dict) and c.get("index", 0) == index for c in choices):
        where = param.replace("_id", "_index") if param != "completion_id" else param
        raise InvalidRequest(f"Completion '{cid}' has no choice {index}.", param=where)
    return comp


def record_feedback(store, caller: str, body: Any, *, idempotency_key: str | None = None,
                    flush: Callable[[], Any] | None = None) -> tuple[dict[str, Any], bool]:
    """Validate and store one feedback; return (stored row, created).

    ``created`` is False for an idempotent replay, whose row is the first one.
    Blocking (it queries and commits): call it from a thread in async code.
    ``flush`` (e.g. ``LogWriter.flush``) is called once if a completion is not
    found yet. Raises InvalidRequest, NotFound, IdempotencyKeyReused.
    """
    rhash = request_hash(body)
    key = check_idempotency_key(idempotency_key)
    if key is not None:
        # Replays are answered before validation: the first call already passed
        # it, and its completions may have changed since.
        prior = store.get_feedback_by_key(caller, key)
        if prior is not None:
            return _replayed(prior, rhash), False
    fields = parse_feedback(body)
    if fields["type"] == "pairwise":
        comps = completions_by_id(store, flush, [fields["chosen_id"], fields["rejected_id"]])
        chosen = _usable(comps[fields["chosen_id"]], caller, fields["chosen_id"], "chosen_id",
                         fields["chosen_index"] or 0)
        rejected = _usable(comps[fields["rejected_id"]], caller, fields["rejected_id"], "rejected_id",
                           fields["rejected_index"] or 0)
        if chosen["conversation_hash"] is None or chosen["conversation_hash"] != rejected["conversation_hash"]:
            raise InvalidRequest("'chosen_id' and 'rejected_id' must answer the same conversation "
                                 "(same messages and tools).", param="rejected_id", code="conversation_mismatch")
        ref = chosen  # a pair's version is the chosen side's: the one the preference favours
    else:
        cid = fields["completion_id"]
        ref = _usable(completions_by_id(store, flush, [cid])[cid], caller, cid, "completion_id", 0)
    row = {**fields, "id": f"fb-{uuid.uuid4().hex}", "created_at": time.time(), "caller": caller,
           "idempotency_key": key, "request_hash": rhash, "version": ref.get("version"),
           "conversation_hash": ref.get("conversation_hash")}
    stored = store.insert_feedback(row)
    if stored["id"] != row["id"]:  # lost a race with a concurrent retry of the same key
        return _replayed(stored, rhash), False
    return stored, True


def _replayed(prior: dict[str, Any], rhash: str) -> dict[str, Any]:
    if prior.get("request_hash") != rhash:
        raise IdempotencyKeyReused("This Idempotency-Key was already used with a different request body.",
                                   param="Idempotency-Key")
    return prior


def public(row: dict[str, Any]) -> dict[str, Any]:
    """The API object for a stored feedback row."""
    return {"id": row["id"], "object": "feedback", "created_at": int(row["created_at"]),
            **{k: row.get(k) for k in PUBLIC_FIELDS}}


def parse_list_query(params: Mapping[str, str]) -> dict[str, Any]:
    """GET /v1/feedback query parameters → ``Store.list_feedback`` filters."""
    out: dict[str, Any] = {"limit": DEFAULT_LIST_LIMIT}
    ftype = params.get("type")
    if ftype is not None:
        if ftype not in FEEDBACK_TYPES:
            raise InvalidRequest(f"'type' must be one of {', '.join(FEEDBACK_TYPES)}.", param="type")
        out["type"] = ftype
    for key in ("completion_id", "version", "after"):
        v = params.get(key)
        if v is not None:
            if not v or len(v) > MAX_ID_CHARS:
                raise InvalidRequest(f"Invalid value for '{key}'.", param=key)
            out[key] = v
    if params.get("since") is not None:
        try:
            since = float(params["since"])
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            raise InvalidRequest("'since' must be a Unix timestamp in seconds.", param="since")
        out["since"] = since
    if params.get("limit") is not None:
        try:
            limit = int(params["limit"])
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}.", param="limit")
        out["limit"] = limit
    return out


def list_page(store, caller: str, query: dict[str, Any]) -> dict[str, Any]:
    """One page of the caller's feedback in OpenAI's list shape. Blocking."""
    limit = query["limit"]
    try:
        # One extra row tells whether another page exists without a COUNT.
        rows = store.list_feedback(caller=caller, **{**query, "limit": limit + 1})
    except KeyError:
        raise InvalidRequest("'after' is not the id of one of your feedback objects.", param="after") from None
    data = [public(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
