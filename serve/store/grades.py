"""Grades and reference feedback: a mixin that ``agentloop.serve.store.Store`` inherits.

What it owns
- ``m006_grades``: the ``reference`` column of ``feedback`` (the assistant message of a
  ``reference`` feedback, JSON: "grade against this", never trained on verbatim) and the
  ``grades`` table: one row per grader per graded candidate, with the grader's name, kind and
  version, the score (NULL when the grader failed), the status and the reason, the completion
  (and choice) it is about, the served version that answered, and the reference feedback it was
  graded against, if any.
- ``GradeStore``: insert and list grades, and the per-version, per-grader summary.

Invariants: ``insert_grades`` commits all of its rows or none; grades are never updated
(grading again adds rows: a grade is a record of what a grader said then).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sqlalchemy import Column, Connection, Float, Index, Integer, MetaData, Table, Text, func, insert, select, text
from sqlalchemy import exc as sa_exc

from agentloop.rl.graders import GRADE_STATUSES

_META = MetaData()


def _grades_v1(md: MetaData) -> Table:
    return Table(
        "grades", md,
        Column("id", Text, primary_key=True),
        Column("created_at", Float, nullable=False),
        Column("completion_id", Text, nullable=False),
        Column("choice_index", Integer, nullable=False),
        Column("version", Text),                 # the served version that answered
        Column("grader", Text, nullable=False),  # its name in the deployment
        Column("grader_type", Text, nullable=False),
        Column("grader_version", Text, nullable=False),
        Column("score", Float),                  # in [0, 1]; NULL when the grader failed
        Column("status", Text, nullable=False),  # "ok" | "failed"
        Column("reason", Text),
        Column("feedback_id", Text),             # the reference feedback graded against, if any
        Column("reference", Text),               # JSON: the reference message used, if any
    )


GRADES = _grades_v1(_META)


def m006_grades(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE feedback ADD COLUMN reference TEXT"))
    md = MetaData()
    t = _grades_v1(md)
    Index("ix_grades_completion_id", t.c.completion_id)
    Index("ix_grades_version_grader", t.c.version, t.c.grader)
    md.create_all(conn)


def _decode(mapping: Any) -> dict[str, Any]:
    row = dict(mapping)
    if row.get("reference") is not None:
        row["reference"] = json.loads(row["reference"])
    return row


class GradeStore:
    """Grades SQL. A mixin: ``self._conn`` comes from agentloop.serve.store.Store."""

    def insert_grades(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store graded rows (completion_id, choice_index, version, grader, grader_type,
        grader_version, score, status, reason, feedback_id, reference) in one transaction; returns
        those stored. A row may bring its own `id`: one whose id is stored already is skipped (a
        grade recorded once however often it is reported, e.g. a tool outcome)."""
        now = time.time()
        out = []
        for r in rows:
            if r.get("status") not in GRADE_STATUSES:
                raise ValueError(f"grade status must be one of {GRADE_STATUSES}")
            out.append({"id": f"grade-{uuid.uuid4().hex}", "created_at": now, "choice_index": 0,
                        "version": None, "score": None, "reason": None, "feedback_id": None, **r})
        params = [{**r, "reference": None if r.get("reference") is None
                   else json.dumps(r["reference"], ensure_ascii=False, separators=(",", ":"))} for r in out]
        if not params:
            return []
        for attempt in (0, 1):
            try:
                with self._conn(write=True) as conn:  # type: ignore[attr-defined]
                    have = set(conn.execute(select(GRADES.c.id).where(
                        GRADES.c.id.in_([p["id"] for p in params]))).scalars())
                    fresh = [p for p in params if p["id"] not in have]
                    if fresh:
                        conn.execute(insert(GRADES), fresh)
                break
            except sa_exc.IntegrityError:
                if attempt:
                    raise  # not a race with a writer of the same ids
        kept = {p["id"] for p in fresh}
        return [r for r in out if r["id"] in kept]

    def list_grades(self, *, completion_id: str | None = None, version: str | None = None,
                    grader: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        q = select(GRADES)
        if completion_id is not None:
            q = q.where(GRADES.c.completion_id == completion_id)
        if version is not None:
            q = q.where(GRADES.c.version == version)
        if grader is not None:
            q = q.where(GRADES.c.grader == grader)
        q = q.order_by(GRADES.c.created_at.desc(), GRADES.c.id.desc()).limit(limit)
        with self._conn() as conn:  # type: ignore[attr-defined]
            return [_decode(m) for m in conn.execute(q).mappings()]

    def grade_summary(self) -> list[dict[str, Any]]:
        """Per (version, grader): how many grades, how many failed, the mean score of the rest."""
        g = GRADES.c
        q = (select(g.version, g.grader, func.count().label("n"),
                    func.sum((g.status == "failed").cast(Integer)).label("failed"),
                    func.avg(g.score).label("mean_score"))
             .group_by(g.version, g.grader).order_by(g.version, g.grader))
        with self._conn() as conn:  # type: ignore[attr-defined]
            return [{**dict(m), "failed": int(m["failed"] or 0)} for m in conn.execute(q).mappings()]
