"""What a grader is: a case in, a score in [0, 1] with a reason out.

A `Case` is one logged request (messages, tools, tool_choice as the gateway logged them), one
candidate assistant message (a choice of its response, or a sampled one) and an optional
reference assistant message ("grade against this": reference feedback, or the body of
`POST /admin/grade`). A `Grader` says whether it applies to a case and scores it; `grade_all`
runs every grader that applies and never raises: a grader that raises, or returns a score that
is not a number in [0, 1], gives a grade with status "failed" and the reason, and the other
graders' grades stand. `grade_group` grades several candidates to one request: a grader that
`ranks` (a judge in rank mode) sees them together in one call and scores them relative to each
other; the others score each alone. A ranking grader's failure fails its grade of every candidate.

Invariant: pure Python, no I/O of its own (a grader that needs some, like a judge model, does
it inside `score`); graders are immutable after construction, so one set serves every thread.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

GRADE_STATUSES = ("ok", "failed")


@dataclass(frozen=True)
class Case:
    request: dict[str, Any]
    candidate: dict[str, Any]
    reference: dict[str, Any] | None = None

    @property
    def tools(self) -> list[dict[str, Any]]:
        tools = self.request.get("tools")
        return tools if isinstance(tools, list) else []


@dataclass(frozen=True)
class Grade:
    grader: str              # the grader's name in this deployment
    type: str                # its kind ("tool_schema", "reference_call", ...)
    version: str             # the kind's version: a grade is comparable with grades of the same one
    score: float | None      # in [0, 1]; None when the grader failed
    reason: str
    status: str = "ok"       # "ok" or "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"grader": self.grader, "type": self.type, "grader_version": self.version, "score": self.score,
                "reason": self.reason, "status": self.status}


class GraderConfigError(ValueError):
    """A grader spec that cannot be built (unknown type, missing or bad field); says which."""


class Grader(ABC):
    """One way of scoring a candidate. Subclasses set `type` and `version` and implement `score`;
    `fields` are the spec keys they accept besides `type` and `name` (checked by `build`)."""

    type: ClassVar[str]
    version: ClassVar[str] = "1"
    fields: ClassVar[frozenset[str]] = frozenset()
    ranks: bool = False  # True: `score_group` judges the candidates together (not each alone)

    def __init__(self, name: str | None = None):
        self.name = name or self.type

    def applies(self, case: Case) -> bool:  # pragma: no cover - every built-in overrides it
        return True

    @abstractmethod
    def score(self, case: Case) -> tuple[float, str]:
        """(score in [0, 1], reason). May raise: the grade is then recorded as failed."""

    def score_group(self, cases: list[Case]) -> list[tuple[float, str]]:
        """(score, reason) of each case, all with one request and different candidates. The default
        scores each alone; a grader that `ranks` overrides it to see them together. May raise."""
        return [self.score(c) for c in cases]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "version": self.version, **self.options()}

    def options(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Let go of what the grader holds (a worker process); it may be used again after."""


@dataclass
class GraderSet:
    """The graders of one deployment, in their configured order."""

    graders: list[Grader] = field(default_factory=list)

    def describe(self) -> list[dict[str, Any]]:
        return [g.describe() for g in self.graders]

    def grade(self, case: Case) -> list[Grade]:
        return grade_all(self.graders, case)

    def grade_group(self, cases: list[Case]) -> list[list[Grade]]:
        return grade_group(self.graders, cases)

    def close(self) -> None:
        for g in self.graders:
            g.close()


def _failed(g: Grader, reason: str) -> Grade:
    return Grade(g.name, g.type, g.version, None, reason[:1000], "failed")


def _checked(g: Grader, result: Any) -> Grade:
    """The grade of what `score` returned: a (score in [0, 1], reason) pair, else a failed grade."""
    if not isinstance(result, tuple) or len(result) != 2:
        return _failed(g, f"returned {str(result)[:200]!r}, not (score, reason)")
    score, reason = result
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
            or not 0.0 <= score <= 1.0:
        return _failed(g, f"score {score!r} is not a number in [0, 1]")
    return Grade(g.name, g.type, g.version, float(score), str(reason)[:1000])


def _applies(g: Grader, case: Case) -> bool | Exception:
    try:
        return bool(g.applies(case))
    except Exception as e:  # noqa: BLE001 - a grader's failure is its grade, not ours
        return e


def grade_all(graders: list[Grader], case: Case) -> list[Grade]:
    """Every applicable grader's grade for `case`; never raises."""
    return grade_group(graders, [case])[0]


def grade_group(graders: list[Grader], cases: list[Case]) -> list[list[Grade]]:
    """Every applicable grader's grades for each of `cases` (one request, several candidates), in
    the graders' order per case; never raises. A ranking grader is asked once for all the cases it
    applies to; a result of the wrong length fails its grade of each."""
    out: list[list[Grade]] = [[] for _ in cases]
    for g in graders:
        applies = [_applies(g, c) for c in cases]
        for i, a in enumerate(applies):
            if isinstance(a, Exception):
                out[i].append(_failed(g, f"{type(a).__name__}: {a}"))
        idx = [i for i, a in enumerate(applies) if a is True]
        if not idx:
            continue
        if g.ranks:
            try:
                results = g.score_group([cases[i] for i in idx])
                if not isinstance(results, list) or len(results) != len(idx):
                    raise ValueError(f"scored {len(results) if isinstance(results, list) else results!r} "
                                     f"of {len(idx)} candidates")
            except Exception as e:  # noqa: BLE001 - a grader's failure is its grade, not ours
                results = [e] * len(idx)
        else:
            results = []
            for i in idx:
                try:
                    results.append(g.score(cases[i]))
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        for i, r in zip(idx, results):
            out[i].append(_failed(g, f"{type(r).__name__}: {r}") if isinstance(r, Exception) else _checked(g, r))
    return out
