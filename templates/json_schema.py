"""JSON Schema rewrites for the grammars that constrain what the model writes in a template's turn.

Owns `transform` (a copy of a schema with a function applied to every subschema, innermost
first) and `bound_integers`. Used by the gateway (serve/protocol.py, a client's
response_format) and by the engine's call grammar (serve/inside_vllm/call_grammar.py, tool
arguments). Pure functions of the stdlib; the client's schema is never mutated.

Invariant: a rewrite only narrows what the grammar lets the model write where the schema
left it unbounded and no client could mean it: never what a schema states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Where a JSON Schema nests subschemas: by name, in lists, or as one value.
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")

# The integers every JSON parser reads exactly (RFC 8259 section 6: IEEE doubles).
SAFE_INTEGER = 2**53 - 1


def transform(node: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A copy of `node` where `fn` has rewritten every schema object, its subschemas first."""
    if isinstance(node, list):
        return [transform(v, fn) for v in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: transform(v, fn) for name, v in out[key].items()}
    for key in SUBSCHEMA_LISTS + SUBSCHEMA_ONE:
        if key in out:
            out[key] = transform(out[key], fn)
    return fn(out)


def _bound(node: dict[str, Any]) -> dict[str, Any]:
    kind = node.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        if "minimum" not in node and "exclusiveMinimum" not in node:
            node["minimum"] = -SAFE_INTEGER
        if "maximum" not in node and "exclusiveMaximum" not in node:
            node["maximum"] = SAFE_INTEGER
    return node


def bound_integers(schema: Any) -> Any:
    """Give every integer without a bound JSON's safe range, ±(2**53 - 1).

    A grammar for an unbounded integer takes digits for ever, and a small model will
    write them ("population": 1111111... until max_tokens, measured on the default
    model: 3 of 10 structured answers). Past 2**53 a JSON number cannot be read back
    exactly anyway, so no client asks for one; a bound the schema states is kept."""
    return transform(schema, _bound)
