"""Graders of an answer's text: string checks and regular expressions.

`string_check` (OpenAI's string-check grader's operations): the candidate's content against a
`value` given in the spec, or, without one, the reference's content:
- `eq` / `ne`: equal / not equal, surrounding whitespace ignored;
- `like` / `ilike`: the content contains the value (`ilike`: ignoring case).
It applies when the candidate has text content and there is something to compare with.

`regex`: the candidate's content matches `pattern` (Python `re.search`; `flags: "i"` ignores
case, `"s"` lets `.` match newlines, `"m"` makes `^`/`$` match at line ends); `invert: true`
scores a match 0 instead (say, "never mentions a competitor"). Patterns are the
deployment's own configuration, compiled when the graders are built: a bad one refuses the
configuration, never a grade.

Invariant: pure and deterministic; score 1.0 or 0.0.
"""

from __future__ import annotations

import re
from typing import Any

from agentloop.rl.graders.base import Case, Grader, GraderConfigError

_OPS = ("eq", "ne", "like", "ilike")
_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE}


def _content(message: dict[str, Any] | None) -> str | None:
    c = (message or {}).get("content")
    return c if isinstance(c, str) else None


class StringCheckGrader(Grader):
    type = "string_check"
    fields = frozenset({"operation", "value"})

    def __init__(self, name: str | None = None, *, operation: str = "eq", value: str | None = None):
        super().__init__(name)
        if operation not in _OPS:
            raise GraderConfigError(f"string_check 'operation' must be one of {', '.join(_OPS)}; got {operation!r}")
        if value is not None and not isinstance(value, str):
            raise GraderConfigError("string_check 'value' must be a string")
        self.operation, self.value = operation, value

    def options(self) -> dict[str, Any]:
        return {"operation": self.operation, "value": self.value}

    def _against(self, case: Case) -> str | None:
        return self.value if self.value is not None else _content(case.reference)

    def applies(self, case: Case) -> bool:
        return _content(case.candidate) is not None and self._against(case) is not None

    def score(self, case: Case) -> tuple[float, str]:
        text, want = _content(case.candidate) or "", self._against(case) or ""
        source = "the value" if self.value is not None else "the reference"
        if self.operation in ("eq", "ne"):
            same = text.strip() == want.strip()
            ok = same if self.operation == "eq" else not same
            return float(ok), f"{'equals' if same else 'differs from'} {source}"
        found = (want.lower() in text.lower()) if self.operation == "ilike" else (want in text)
        return float(found), f"{'contains' if found else 'does not contain'} {source}"


class RegexGrader(Grader):
    type = "regex"
    fields = frozenset({"pattern", "flags", "invert"})

    def __init__(self, name: str | None = None, *, pattern: str | None = None, flags: str = "",
                 invert: bool = False):
        super().__init__(name)
        if not isinstance(pattern, str) or not pattern:
            raise GraderConfigError("regex needs a 'pattern' (a non-empty string)")
        if not isinstance(flags, str) or set(flags) - set(_FLAGS):
            raise GraderConfigError(f"regex 'flags' takes the letters {''.join(_FLAGS)}; got {flags!r}")
        if not isinstance(invert, bool):
            raise GraderConfigError("regex 'invert' must be true or false")
        bits = 0
        for f in flags:
            bits |= _FLAGS[f]
        try:
            self.regex = re.compile(pattern, bits)
        except re.error as e:
            raise GraderConfigError(f"regex pattern {pattern!r}: {e}") from None
        self.pattern, self.flags, self.invert = pattern, flags, invert

    def options(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "flags": self.flags, "invert": self.invert}

    def applies(self, case: Case) -> bool:
        return _content(case.candidate) is not None

    def score(self, case: Case) -> tuple[float, str]:
        m = self.regex.search(_content(case.candidate) or "")
        ok = (m is None) if self.invert else (m is not None)
        what = f"matches at {m.start()}: {m.group(0)[:60]!r}" if m else "does not match"
        return float(ok), f"{what} /{self.pattern}/{self.flags}"
