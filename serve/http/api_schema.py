"""OpenAPI descriptions of the request bodies and parameters the routes read by hand.

The chat, feedback and admin routes take the raw body (`request.body()`) and
check it themselves (serve/protocol.py, serve/services/feedback.py, serve/http/admin.py), so
that every mistake is an OpenAI-shaped 400 rather than FastAPI's 422; FastAPI
therefore sees no body model and documents none. This module adds the
descriptions to the generated OpenAPI document, so that clients and fuzzers
(tests/test_fuzz.py, schemathesis) know what a real request looks like.

Invariant: documentation only. Nothing here validates or changes a request;
the hand-written checks stay the one source of truth, and the schemas say
what they accept (a valid request here is one the gateway accepts, up to what
only the engine can judge, such as a prompt's length).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from agentloop.rl.schema import FEEDBACK_TYPES
from agentloop.serve.services.feedback import (
    MAX_CHOICE_INDEX, MAX_COMMENT_CHARS, MAX_ID_CHARS, MAX_KEY_CHARS, MAX_LIST_LIMIT,
)

_STR = {"type": "string"}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": ["text"]}, "text": _STR}}
_CONTENT = {"anyOf": [_STR, {"type": "array", "items": _TEXT_PART}]}
_TOOL_CALL = {
    "type": "object", "required": ["id", "type", "function"],
    "properties": {
        "id": _STR, "type": {"enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string", "minLength": 1},
                                    "arguments": {"type": "string", "description": "JSON text"}}},
    },
}


def _message(role: str | list[str], required: list[str], **props: Any) -> dict[str, Any]:
    roles = [role] if isinstance(role, str) else role
    return {"type": "object", "required": ["role", *required],
            "properties": {"role": {"enum": roles}, "name": _STR, **props}}


MESSAGE = {"oneOf": [
    _message(["system", "developer"], ["content"], content=_CONTENT),
    _message("user", ["content"], content=_CONTENT),
    _message("assistant", [], content={"anyOf": [_CONTENT, {"type": "null"}]},
             tool_calls={"type": "array", "items": _TOOL_CALL}, reasoning_content=_STR),
    _message("tool", ["content", "tool_call_id"], content=_CONTENT, tool_call_id=_STR),
]}

TOOL = {
    "type": "object", "required": ["type", "function"],
    "properties": {
        "type": {"enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": _STR,
            "parameters": {"type": "object", "description": "A JSON Schema of the arguments object."},
            "strict": {"type": "boolean"},
        }},
    },
}

CHAT_REQUEST = {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1,
                  "description": "`agentloop`, or `agentloop@vNNNN` to pin a version"},
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "tools": {"type": "array", "minItems": 1, "items": TOOL},  # the engine refuses an empty list
        "tool_choice": {"anyOf": [
            {"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "function"], "properties": {
                "type": {"enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": _STR}}}},
        ]},
        "parallel_tool_calls": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1},
        "stop": {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "response_format": {"oneOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"enum": ["json_schema"]},
                "json_schema": {"type": "object", "required": ["name"], "properties": {
                    "name": _STR, "schema": {"type": "object"}, "strict": {"type": "boolean"}}}}},
        ]},
        "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high"]},
        "chat_template_kwargs": {"type": "object", "properties": {"enable_thinking": {"type": "boolean"}}},
        "user": _STR,
    },
}

_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "description": "a chat completion id"}
_COMMENT = {"type": "string", "maxLength": MAX_COMMENT_CHARS}
_INDEX = {"type": "integer", "minimum": 0, "maximum": MAX_CHOICE_INDEX}


def _feedback(kind: str, required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["type", *required],
            "properties": {"type": {"enum": [kind]}, "comment": _COMMENT, **props}}


_ASSISTANT = {
    "type": "object", "required": ["role"], "additionalProperties": False, "properties": {
        "role": {"enum": ["assistant"]}, "content": {"type": ["string", "null"]},
        "tool_calls": {"type": "array", "items": _TOOL_CALL}, "reasoning_content": _STR},
    # An assistant message that says something: text, or at least one call.
    "anyOf": [{"required": ["content"], "properties": {"content": _STR}},
              {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}}]}

FEEDBACK_REQUEST = {"oneOf": [
    _feedback("thumbs", ["completion_id", "value"], completion_id=_ID, value={"enum": [1, -1]}),
    _feedback("rating", ["completion_id", "value"], completion_id=_ID,
              value={"type": "integer", "minimum": 1, "maximum": 5}),
    _feedback("correction", ["completion_id", "correction"], completion_id=_ID, correction=_ASSISTANT),
    # The same message, meaning "grade against this" (rl/graders), not "train on this".
    _feedback("reference", ["completion_id", "reference"], completion_id=_ID, reference=_ASSISTANT),
    _feedback("pairwise", ["chosen_id", "rejected_id"], chosen_id=_ID, rejected_id=_ID,
              chosen_index=_INDEX, rejected_index=_INDEX),
]}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


FEEDBACK_LIST_QUERY = [
    _query("type", {"enum": list(FEEDBACK_TYPES)}),
    _query("completion_id", _ID), _query("version", _STR), _query("after", _STR),
    _query("since", {"type": "number"}),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}),
]

_VERSION = {"type": "string", "minLength": 1, "description": "an adapter version, e.g. v0002"}
ADMIN_BODIES = {
    "/admin/login": {"type": "object", "required": ["key"], "properties": {"key": _STR}},
    "/admin/promote": {"type": "object", "required": ["version"], "properties": {"version": _VERSION, "reason": _STR}},
    "/admin/rollback": {"type": "object", "required": ["version"], "properties": {"version": _VERSION}},
    "/admin/canary": {"type": "object", "properties": {
        "version": _VERSION, "share": {"type": "number", "minimum": 0, "maximum": 1}}},
    "/admin/grade": {"type": "object", "required": ["completion_id"], "additionalProperties": False,
                     "properties": {"completion_id": _ID, "reference": _ASSISTANT}},
    "/admin/train": {"type": "object", "properties": {
        "promote": {"type": "boolean"}, "method": {"enum": ["dpo", "kto"]}, "params": {"type": "object"}}},
}

# (path, method) -> the JSON request body's schema, and whether a body is required.
BODIES: dict[tuple[str, str], tuple[dict[str, Any], bool]] = {
    ("/v1/chat/completions", "post"): (CHAT_REQUEST, True),
    ("/v1/feedback", "post"): (FEEDBACK_REQUEST, True),
    **{(path, "post"): (schema, path == "/admin/login") for path, schema in ADMIN_BODIES.items()},
}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "A retry with the same key and body gets the first answer back",
                   "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}}
# (path, method) -> parameters the route reads by hand (query string, headers).
PARAMETERS = {("/v1/feedback", "get"): FEEDBACK_LIST_QUERY, ("/v1/feedback", "post"): [IDEMPOTENCY_KEY]}

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": _STR, "type": _STR, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}},
}


def add_request_docs(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the hand-read bodies, parameters and the OpenAI error shape to a generated document."""
    paths = schema.get("paths", {})
    error = {"description": "An OpenAI-shaped error",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for ops in paths.values():
        for op in ops.values():
            # serve/http/app.py answers FastAPI's validation errors with a 400, never a 422.
            op.get("responses", {}).pop("422", None)
            op.setdefault("responses", {})["4XX"] = error
    for (path, method), (body, required) in BODIES.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            content = {"application/json": {"schema": body}}
            if path == "/admin/login":  # the login page posts a form
                content["application/x-www-form-urlencoded"] = {"schema": body}
            op["requestBody"] = {"required": required, "content": content}
    for (path, method), params in PARAMETERS.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            op["parameters"] = [*op.get("parameters", []), *params]
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    return schema


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) include the request descriptions."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_request_docs(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
