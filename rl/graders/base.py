"""What a grader is: a case in, a score in [0, 1] with a reason out.

A `Case` is one logged request (messages, tools, tool_choice as the gateway logged them), one
candidate assistant message (a choice of its response, or a sampled one) and an optional
reference assistant message ("grade against this": reference feedback, or the body of
`POST /admin/grade`). A `Grader` says whether it applies to a case and scores it; `grade_all`
runs every grader that applies and never raises: a grader that raises, or returns a score that
is not a number in [0, 1], gives a grade with status "failed" and the reason, and the other
graders' grades stand.

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

    def __init__(self, name: str | None = None):
        self.name = name or self.type

    def applies(self, case: Case) -> bool:  # pragma: no cover - every built-in overrides it
        return True

    @abstractmethod
    def score(self, case: Case) -> tuple[float, str]:
        """(score in [0, 1], reason). May raise: the grade is then recorded as failed."""

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

    def close(self) -> None:
        for g in self.graders:
            g.close()


def _failed(g: Grader, reason: str) -> Grade:
    return Grade(g.name, g.type, g.version, None, reason[:1000], "failed")


def grade_all(graders: list[Grader], case: Case) -> list[Grade]:
    """Every applicable grader's grade for `case`; never raises."""
    out = []
    for g in graders:
        try:
            if not g.applies(case):
                continue
            score, reason = g.score(case)
        except Exception as e:  # noqa: BLE001 - a grader's failure is its grade, not ours
            out.append(_failed(g, f"{type(e).__name__}: {e}"))
            continue
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            out.append(_failed(g, f"score {score!r} is not a number in [0, 1]"))
            continue
        out.append(Grade(g.name, g.type, g.version, float(score), str(reason)[:1000]))
    return out
