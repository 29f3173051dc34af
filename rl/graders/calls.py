"""Graders of tool calls: schema validity, and a match with a reference call.

`tool_schema`: every call the candidate makes names a tool of the request and its arguments
are a JSON object valid under that tool's `parameters` schema (jsonschema, the schema's own
draft). Score: the share of valid calls.

`reference_call`: the candidate's calls against the reference message's, BFCL-style (the
Berkeley Function Calling Leaderboard's AST rules, written from its published rules):
- calls pair up in any order (a parallel answer need not keep the reference's order), each
  reference call with a different candidate call of the same function name;
- in a pair, a parameter both give must have an equivalent value: strings equal after
  `normalize_string` (case, spaces and `,./-_*^` ignored), numbers by value (`2` is `2.0`),
  booleans exactly, lists element by element, objects key by key with the same rules;
- a parameter only one side gives is fine when the tool's schema makes it optional and the
  value given is its schema `default` (stating a default or leaving it out means the same);
  anything else is a mismatch.
Score: matched pairs / the larger of the two call counts (a missing or an extra call costs);
a text answer where the reference calls (or the other way round) scores 0.

Invariant: pure and deterministic; the reason names the first mismatch.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agentloop.rl.graders.base import Case, Grader

_MISSING = object()


def normalize_string(s: str) -> str:
    """Strings compare equal if they differ only in case, spaces and `,./-_*^` (BFCL's rule)."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def same_value(a: Any, b: Any) -> bool:
    """Two argument values mean the same (the module's equivalence rules)."""
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and normalize_string(a) == normalize_string(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def calls_of(message: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """(name, parsed arguments) of a message's tool calls; arguments that do not parse stay
    the raw string, so a grader can say so."""
    out = []
    for tc in (message or {}).get("tool_calls") or []:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            out.append(("", None))
            continue
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                pass
        out.append((str(fn.get("name") or ""), args))
    return out


def tool_params(case: Case, name: str) -> dict[str, Any] | None:
    """The `parameters` schema of the request's tool `name` (None: no such tool)."""
    for t in case.tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            return params if isinstance(params, dict) else {"type": "object", "properties": {}}
    return None


class ToolSchemaGrader(Grader):
    type = "tool_schema"

    def applies(self, case: Case) -> bool:
        return bool(calls_of(case.candidate))

    def score(self, case: Case) -> tuple[float, str]:
        from jsonschema import validators
        from jsonschema.exceptions import SchemaError

        calls = calls_of(case.candidate)
        problems = []
        for i, (name, args) in enumerate(calls):
            params = tool_params(case, name)
            if params is None:
                problems.append(f"call {i}: no tool named {name!r} in the request")
            elif not isinstance(args, dict):
                problems.append(f"call {i} ({name}): arguments are not a JSON object")
            else:
                cls = validators.validator_for(params)
                try:
                    cls.check_schema(params)
                except SchemaError as e:
                    raise ValueError(f"tool {name!r} has an invalid parameters schema: {e.message}") from None
                err = next(iter(sorted(cls(params).iter_errors(args), key=lambda e: list(e.path))), None)
                if err is not None:
                    where = "/".join(str(p) for p in err.path) or "arguments"
                    problems.append(f"call {i} ({name}): {where}: {err.message}")
        valid = len(calls) - len(problems)
        reason = "; ".join(problems[:3]) or f"{len(calls)} call(s) valid against their tools' schemas"
        return valid / len(calls), reason


class ReferenceCallGrader(Grader):
    type = "reference_call"

    def applies(self, case: Case) -> bool:
        return case.reference is not None and bool(calls_of(case.reference) or calls_of(case.candidate))

    def score(self, case: Case) -> tuple[float, str]:
        want, got = calls_of(case.reference), calls_of(case.candidate)
        if not got:
            return 0.0, f"answered in text where the reference makes {len(want)} call(s)"
        if not want:
            return 0.0, f"made {len(got)} call(s) where the reference answers in text"
        free = list(range(len(got)))
        matched, first = 0, ""
        for name, args in want:
            reasons = []
            for i in free:
                why = self._mismatch(case, name, args, *got[i])
                if why is None:
                    free.remove(i)
                    matched += 1
                    break
                reasons.append(why)
            else:
                first = first or f"no call matches the reference's {name}: " + "; ".join(reasons[:2])
        n = max(len(want), len(got))
        if matched == n:
            return 1.0, f"{n} call(s) match the reference"
        if not first:
            first = f"{len(got) - matched} call(s) more than the reference's {len(want)}"
        return matched / n, first

    @staticmethod
    def _mismatch(case: Case, want_name: str, want: Any, name: str, got: Any) -> str | None:
        """Why the call (name, got) is not the reference call (want_name, want); None if it is."""
        if name != want_name:
            return f"calls {name!r}"
        if not isinstance(got, dict):
            return "arguments are not a JSON object"
        if not isinstance(want, dict):
            return "the reference's arguments are not a JSON object"
        params = tool_params(case, name) or {}
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        required = set(params.get("required") or [])
        for key in sorted(want.keys() | got.keys()):
            a, b = got.get(key, _MISSING), want.get(key, _MISSING)
            if a is not _MISSING and b is not _MISSING:
                if not same_value(a, b):
                    return f"{key}={json.dumps(a)[:60]}, the reference has {json.dumps(b)[:60]}"
                continue
            given = a if a is not _MISSING else b
            spec = props.get(key) if isinstance(props.get(key), dict) else {}
            if key in required or "default" not in spec or not same_value(given, spec["default"]):
                side = "leaves out" if a is _MISSING else "adds"
                return f"{side} {key!r}" + ("" if key in required else " (not its default)")
        return None
