"""The grammar of a constrained tool call, as the engine's xgrammar compiles it.

Owns: the rewrite of vLLM's "hermes" structural tag (`constrain_call_tag`),
the arguments schema of a tool (`object_schema`) and the check that a tool's
schema can be compiled at all (`check_tool_schemas`, a 400 naming the tool).
Only ever imported inside a vLLM process (it imports vllm and xgrammar).

Invariants: a call's arguments are always a JSON object, in the chat
template's own JSON style (", " and ": ", as Jinja's tojson writes every
training row) with no other whitespace between tokens, so a constrained call
ends when its value does; a response_format OR-ed into a tool tag is compact
JSON, as vLLM writes response_format elsewhere with `disable_any_whitespace`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import xgrammar
from vllm.exceptions import VLLMValidationError

from agentloop.templates.json_schema import bound_integers, transform

# JSON that ends: a call's arguments are written in the template's own JSON style
# (Jinja's `tojson` is json.dumps: ", " and ": "), the form every training row
# has, with no other whitespace between tokens. Free whitespace let a small model
# run on in newlines (or spaces) until max_tokens; one exact form cannot.
ARGUMENT_SEPARATORS = (", ", ": ")
# A response_format OR-ed into a tool tag is written as vLLM writes it elsewhere
# with `disable_any_whitespace` (serve/engine/supervisor.py): compact.
RESPONSE_SEPARATORS = (",", ":")


def _declare_missing(out: dict[str, Any]) -> dict[str, Any]:
    required = out.get("required")
    props = out.get("properties") if isinstance(out.get("properties"), dict) else {}
    if isinstance(required, list) and out.get("additionalProperties") is not False:
        missing = [r for r in required if isinstance(r, str) and r not in props]
        if missing:
            out["properties"] = {**props, **{r: {} for r in missing}}
    return out


def _declare_required(node: Any) -> Any:
    """Copy of `node` where every object's `required` keys are in its `properties`.

    xgrammar writes only declared properties (undeclared ones count as not
    allowed), so a key that is required but not declared -- valid JSON Schema,
    the key may hold anything -- could never be written: the grammar would
    force an object that fails the schema. Declaring it as `{}` (any value)
    is what the schema means. Left alone under `additionalProperties: false`,
    where the schema itself cannot be met.
    """
    return transform(node, _declare_missing)


def object_schema(schema: Any) -> dict[str, Any]:
    """The arguments grammar for a tool's `parameters`, always an object schema.

    None, `true` and `{}` mean "any arguments": any object. A schema without a
    type gets `"type": "object"` (alongside `$ref`/`anyOf`, xgrammar
    intersects). Unbounded integers get JSON's safe range (tools/json_schema.py),
    so a call cannot run on in digits. Raises ValueError for a schema that
    cannot describe an object.
    """
    if schema is None or schema is True:
        return {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    kind = schema.get("type")
    if kind is None or (isinstance(kind, list) and "object" in kind):
        schema = {**schema, "type": "object"}
    elif kind != "object":
        raise ValueError(f'must be a JSON Schema of "type": "object", got "type": {json.dumps(kind)}')
    return bound_integers(_declare_required(schema))


@functools.lru_cache(maxsize=1024)
def _compact_json_grammar(schema_json: str, separators: tuple[str, str]) -> str:
    """EBNF for JSON values of a schema, exactly `separators` between tokens and no
    other whitespace (strict: no undeclared properties, as xgrammar's json_schema
    format is). Structural tags take whitespace only as a bound of at least one
    (`max_whitespace_cnt`), so the grammar goes in as a `grammar` format instead.
    Cached per schema text (property order matters: it is the order written)."""
    grammar = xgrammar.Grammar.from_json_schema(schema_json, any_whitespace=False, separators=separators,
                                                strict_mode=True)
    return str(grammar)


def _compact_format(schema: Any, separators: tuple[str, str]) -> dict[str, Any]:
    return {"type": "grammar", "grammar": _compact_json_grammar(json.dumps(schema), separators)}


def _arguments_format(schema: Any) -> dict[str, Any]:
    return _compact_format(schema, ARGUMENT_SEPARATORS)


@functools.lru_cache(maxsize=512)
def _schema_problem(schema_json: str) -> str | None:
    """Why xgrammar cannot build the arguments grammar, or None. Cached per
    schema text: a client sends the same tools again and again."""
    try:
        _arguments_format(json.loads(schema_json))  # the grammar the tag will carry, built (and cached)
    except Exception as e:  # xgrammar raises RuntimeError with a C++ location prefix
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return message.split(": ", 1)[-1] if message.startswith("[") else message
    return None


def check_tool_schemas(tools: Sequence[Any]) -> None:
    """Raise VLLMValidationError (HTTP 400) naming the first tool whose parameters
    the grammar backend cannot use."""
    for i, tool in enumerate(tools):
        function = getattr(tool, "function", None)
        if function is None:
            continue
        where = f"tools[{i}].function.parameters"
        try:
            schema = object_schema(function.parameters)
        except ValueError as e:
            raise VLLMValidationError(f"Invalid schema for function '{function.name}': {where} {e}.",
                                      parameter=where) from None
        problem = _schema_problem(json.dumps(schema, sort_keys=True))
        if problem is not None:
            raise VLLMValidationError(
                f"Invalid schema for function '{function.name}': {where} cannot be used to constrain "
                f"tool calls: {problem}", parameter=where)


def constrain_call_tag(structural_tag: str, open_tag: str, close_tag: str, separator: str = "\n") -> str:
    """Rewrite vLLM's tool-call structural tag: every call's arguments format
    becomes an object schema in the template's JSON style with no free
    whitespace, and the free text of auto mode may not contain `close_tag`
    (outside a call it is only ever stray markup, which would reach the client
    as content). A response_format OR-ed in for auto becomes compact JSON, as
    vLLM writes it outside tags."""
    tag = json.loads(structural_tag)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if node.get("type") == "triggered_tags" and open_tag in (node.get("triggers") or ()):
            excludes = list(node.get("excludes") or [])
            node["excludes"] = excludes + ([close_tag] if close_tag not in excludes else [])
        if (node.get("type") == "tags_with_separator" and not node.get("separator")
                and any(str(t.get("begin", "")).startswith(open_tag) for t in node.get("tags") or ())):
            # vLLM joins forced calls with "", but our template (what the model
            # was trained on) puts a newline between two calls: with "" the
            # grammar could only end the turn after the first call.
            node["separator"] = separator
        content = node.get("content")
        if (node.get("type") == "tag" and str(node.get("begin", "")).startswith(open_tag)
                and isinstance(content, dict) and content.get("type") == "json_schema"):
            node["content"] = _arguments_format(object_schema(content.get("json_schema")))
            return
        if node.get("type") == "json_schema" and node.get("style", "json") == "json":
            fmt = _compact_format(node.get("json_schema"), RESPONSE_SEPARATORS)
            node.clear()
            node.update(fmt)
            return
        for value in node.values():
            visit(value)

    visit(tag)
    return json.dumps(tag)
