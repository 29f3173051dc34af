"""BFCL v3 function docs as OpenAI tools, and an AST checker for the calls a model makes.

Owns: reading the Berkeley Function Calling Leaderboard v3 data (`BFCL_v3_<category>.json`
and `possible_answer/BFCL_v3_<category>.json`, JSON lines), turning its function docs into
OpenAI `tools`, and deciding whether a model's calls match the ground truth, for the
`simple`, `multiple`, `parallel` and `parallel_multiple` categories. Written from the data's
format and BFCL's published AST rules, not copied from its code.

Ground truth: one dict per expected call, `{function_name: {param: [allowed values]}}`. A
parameter whose list contains `""` may be left out; a nested dict holds its own
`{key: [allowed values]}`; a list value is one allowed whole list.

Checking rules (per call, given the function's BFCL doc):
- the function name must be the expected one;
- every parameter the doc requires must be present, and every parameter given must be in
  the doc and in the ground truth;
- a value must have the doc's type (`integer` is an int and not a bool; `float` accepts an
  int; `tuple` is a list; `any` accepts anything) and equal one allowed value, strings
  compared after `normalize_string` (case, spaces and `,./-_*^` ignored), lists element by
  element, dicts key by key with the same rules;
- a parameter left out must allow `""`.
`simple`/`multiple` expect exactly one call; `parallel*` expect as many calls as the ground
truth, matched in any order (each ground-truth call to a different model call).

Invariant: pure and deterministic -- no I/O besides `load_category`, no randomness; every
check returns `(ok, reason)` with a short reason when not ok.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentloop.rl.graders import normalize_string  # the loop's graders compare strings by the same rule

__all__ = [
    "CATEGORIES", "load_category", "openai_name", "to_openai_schema", "to_openai_tool",
    "normalize_string", "check_call", "check_calls",
]

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
_SINGLE_CALL = {"simple", "multiple"}

# BFCL type names -> JSON Schema type names ("any" means no type).
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "integer": "integer",
          "string": "string", "boolean": "boolean", "array": "array", "object": "object",
          "number": "number", "any": None}
# BFCL keys that are not JSON Schema: requiredness is in `required`.
_NON_SCHEMA_KEYS = {"optional"}


def load_category(data_dir: Path | str, category: str) -> list[dict[str, Any]]:
    """The cases of one category, each with its `ground_truth` attached, in file order."""
    data_dir = Path(data_dir)
    answers = {}
    with open(data_dir / "possible_answer" / f"BFCL_v3_{category}.json", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                answers[row["id"]] = row["ground_truth"]
    cases = []
    with open(data_dir / f"BFCL_v3_{category}.json", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["ground_truth"] = answers[row["id"]]
                row["category"] = category
                cases.append(row)
    return cases


def openai_name(name: str) -> str:
    """OpenAI function names allow `[a-zA-Z0-9_-]`: BFCL's dotted names get `_` (as BFCL does)."""
    return name.replace(".", "_")


def to_openai_schema(node: Any) -> Any:
    """A BFCL parameter doc as JSON Schema (recursively): BFCL type names mapped, `optional` dropped."""
    if isinstance(node, list):
        return [to_openai_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _NON_SCHEMA_KEYS:
            continue
        if key == "type" and isinstance(value, str):
            mapped = _TYPES.get(value, value)
            if mapped is not None:
                out["type"] = mapped
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: to_openai_schema(v) for name, v in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf"):
            out[key] = to_openai_schema(value)
        else:
            out[key] = value
    return out


def to_openai_tool(function: dict[str, Any]) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": openai_name(function["name"]),
                          "parameters": to_openai_schema(function.get("parameters") or {"type": "dict"})}
    if function.get("description"):
        fn["description"] = function["description"]
    return {"type": "function", "function": fn}


# ------------------------------------------------------------------ values


def _type_ok(value: Any, bfcl_type: str | None) -> bool:
    if bfcl_type in (None, "any"):
        return True
    if bfcl_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if bfcl_type in ("float", "number"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if bfcl_type == "string":
        return isinstance(value, str)
    if bfcl_type == "boolean":
        return isinstance(value, bool)
    if bfcl_type in ("array", "tuple"):
        return isinstance(value, list)
    if bfcl_type in ("dict", "object"):
        return isinstance(value, dict)
    return True


def _same(value: Any, allowed: Any) -> bool:
    """One model value against one allowed value (lists element-wise, dicts key-wise)."""
    if isinstance(allowed, str):
        return isinstance(value, str) and normalize_string(value) == normalize_string(allowed)
    if isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed
    if isinstance(allowed, (int, float)):
        return isinstance(value, (int, float)) and value == allowed
    if isinstance(allowed, list):
        return (isinstance(value, list) and len(value) == len(allowed)
                and all(_matches(v, a) for v, a in zip(value, allowed)))
    if isinstance(allowed, dict):
        return isinstance(value, dict) and _dict_ok(value, allowed)
    return value == allowed


def _matches(value: Any, allowed: Any) -> bool:
    """A list element: a nested ground-truth dict holds per-key choices, anything else is one value."""
    if isinstance(allowed, dict) and isinstance(value, dict):
        return _dict_ok(value, allowed)
    return _same(value, allowed)


def _dict_ok(value: dict, allowed: dict) -> bool:
    """`allowed` maps each key to its list of allowed values (`""` in it: the key may be absent).
    A ground-truth dict written as plain values (no lists) compares value by value."""
    for key, choice in value.items():
        if key not in allowed:
            return False
        options = allowed[key] if isinstance(allowed[key], list) else [allowed[key]]
        if not any(_same(choice, o) for o in options if o != ""):
            return False
    for key, options in allowed.items():
        if key not in value and not (isinstance(options, list) and "" in options):
            return False
    return True


# ------------------------------------------------------------------- calls


def check_call(function_doc: dict[str, Any], name: str, args: Any,
               expected: dict[str, list[Any]]) -> tuple[bool, str]:
    """One model call (`name`, parsed `args`) against one ground-truth call of `function_doc`."""
    if openai_name(name) != openai_name(function_doc["name"]):
        return False, f"wrong function {name!r}"
    if not isinstance(args, dict):
        return False, "arguments are not an object"
    params = (function_doc.get("parameters") or {}).get("properties") or {}
    for req in (function_doc.get("parameters") or {}).get("required") or []:
        if req not in args:
            return False, f"missing required parameter {req!r}"
    for key, value in args.items():
        if key not in params or key not in expected:
            return False, f"unexpected parameter {key!r}"
        if not _type_ok(value, params[key].get("type")):
            return False, f"parameter {key!r} has the wrong type"
        if not any(_same(value, option) for option in expected[key] if option != ""):
            return False, f"parameter {key!r}: {json.dumps(value)[:60]} is not an allowed value"
    for key, options in expected.items():
        if key not in args and "" not in options:
            return False, f"optional parameter {key!r} left out but expected"
    return True, ""


def _doc_for(functions: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The function doc a ground-truth call refers to. A few ground truths drop the
    doc name's dotted prefix (`find_closest` for `restaurant_search.find_closest`)."""
    for f in functions:
        if openai_name(f["name"]) == openai_name(name):
            return f
    tails = [f for f in functions if f["name"].rsplit(".", 1)[-1] == name]
    if len(tails) == 1:
        return tails[0]
    return functions[0] if len(functions) == 1 else None


def check_calls(case: dict[str, Any], calls: list[tuple[str, Any]]) -> tuple[bool, str]:
    """All the model's calls (name, parsed arguments) for one case, by its category's rule."""
    truth = case["ground_truth"]
    if case["category"] in _SINGLE_CALL and len(calls) != 1:
        return False, f"expected one call, got {len(calls)}"
    if len(calls) != len(truth):
        return False, f"expected {len(truth)} calls, got {len(calls)}"
    unmatched = list(range(len(calls)))
    for expected_call in truth:
        ((fname, expected),) = expected_call.items()
        doc = _doc_for(case["function"], fname)
        if doc is None:
            return False, f"ground truth names unknown function {fname!r}"
        reasons = []
        for i in unmatched:
            ok, reason = check_call(doc, calls[i][0], calls[i][1], expected)
            if ok:
                unmatched.remove(i)
                break
            reasons.append(reason)
        else:
            return False, f"no call matches {fname}: " + "; ".join(reasons[:2])
    return True, ""
