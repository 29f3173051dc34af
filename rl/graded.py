"""Preference data from grades: which answers to one prompt are better, by what graders say.

What it owns: scoring a prompt's candidate answers with a deployment's graders (rl/graders), one
score per candidate, and the rules that turn scores into training rows' shape:
- DPO: the best candidate against the worst, only when their scores differ by at least a margin
  (a smaller difference is noise of the graders, not a preference); a best that passes, with no
  pair to make, may stand as a positive-only row;
- KTO: a candidate scoring at least `desirable_min` is desirable, at most `undesirable_max`
  undesirable, one between is left out.
rl/datasets.py uses it for reference feedback (the logged answers of the conversation graded
against the reference); sampled candidates (on-policy learning) take the same path.

Invariants
- A candidate's score is the mean of its graders' "ok" grades; a candidate no grader scored (none
  applies, or every one failed) has no score and is never in a row: a failed grader never makes
  an answer look worse or better.
- Deterministic for deterministic graders: ties keep the candidates' given order (the first best,
  the last worst).
- The reference itself is never a candidate: it says what to grade against, not what to train on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentloop.rl.graders import Case, Grade, GraderSet


@dataclass(frozen=True)
class Scored:
    """One candidate answer and what the graders said about it."""

    message: dict[str, Any]          # the assistant message, as a training row holds it
    grades: tuple[Grade, ...] = field(default=())

    @property
    def score(self) -> float | None:
        ok = [g.score for g in self.grades if g.status == "ok" and g.score is not None]
        return sum(ok) / len(ok) if ok else None

    @property
    def failed(self) -> int:
        return sum(g.status != "ok" for g in self.grades)


def score_candidates(graders: GraderSet, request: dict[str, Any], candidates: list[dict[str, Any]],
                     reference: dict[str, Any] | None = None) -> list[Scored]:
    """Each candidate with its grades, in the given order; a ranking grader (a judge in rank mode) sees
    them together (graders never raise: base.grade_group)."""
    grades = graders.grade_group([Case(request=request, candidate=c, reference=reference) for c in candidates])
    return [Scored(c, tuple(g)) for c, g in zip(candidates, grades)]


def best_and_worst(scored: list[Scored], margin: float) -> tuple[Scored, Scored] | None:
    """(best, worst) of the scored candidates when best - worst >= margin, else None."""
    ranked = [s for s in scored if s.score is not None]
    if len(ranked) < 2:
        return None
    best = max(ranked, key=lambda s: s.score)  # the first of equal bests
    worst = min(reversed(ranked), key=lambda s: s.score)  # the last of equal worsts
    if best is worst or best.score - worst.score < margin:
        return None
    return best, worst


def kto_label(score: float | None, desirable_min: float, undesirable_max: float) -> bool | None:
    """True (desirable), False (undesirable) or None (unscored, or between the thresholds)."""
    if score is None:
        return None
    if score >= desirable_min:
        return True
    if score <= undesirable_max:
        return False
    return None
