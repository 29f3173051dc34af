"""Aggregate numbers for the loop dashboard: a mixin that ``agentloop.serve.store.Store`` inherits.

Part of the store layer (all SQL lives in serve/store/), kept apart only to
keep files small. It owns no table and no migration: it only reads
``feedback`` (serve/store/feedback.py) and ``completions`` (serve/store/db.py).

What it owns
- ``StatsStore.feedback_stats``: feedback counts by (version, type) and
  thumbs up/down by version — what ``GET /admin/stats`` shows.
- ``StatsStore.traffic_stats``: completions by version, for the observed
  canary share of the alias's traffic.

Invariants
- Read-only, one short read transaction per call, aggregation in SQL
  (GROUP BY), so a dashboard refresh costs the same however large the log is.
- Rows with no version (a completion that failed before routing, feedback on
  such a completion) are reported under ``version: null``, never dropped.

Never imports fastapi, torch or vllm, nor serve.store (which imports it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, column, func, select, table

# Lightweight handles on the tables this reads (serve.store.COMPLETIONS and
# store_feedback.FEEDBACK would work too; these keep the mixin import-light and
# free of the circular import with serve.store).
_FEEDBACK = table("feedback", column("created_at"), column("type"), column("value"), column("version"))
_COMPLETIONS = table("completions", column("created_at"), column("model"), column("version"),
                     column("status_code"))


class StatsStore:
    """Dashboard aggregates. A mixin: ``self._conn`` comes from agentloop.serve.store.Store."""

    def feedback_stats(self, *, since: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """Feedback since ``since`` (inclusive; None: all time), aggregated.

        ``{"by_type": [{"version", "type", "count"}], "thumbs": [{"version", "up", "down"}]}``,
        each ordered by version (nulls first) then type. A pairwise row counts
        under its chosen side's version, as the feedback table records it.
        """
        f = _FEEDBACK.c
        conds = [] if since is None else [f.created_at >= since]
        by_type = (select(f.version, f.type, func.count().label("count")).where(*conds)
                   .group_by(f.version, f.type).order_by(f.version, f.type))
        up = func.sum(case((f.value > 0, 1), else_=0))
        down = func.sum(case((f.value < 0, 1), else_=0))
        thumbs = (select(f.version, up.label("up"), down.label("down")).where(f.type == "thumbs", *conds)
                  .group_by(f.version).order_by(f.version))
        with self._conn() as conn:  # type: ignore[attr-defined]
            return {
                "by_type": [{"version": r.version, "type": r.type, "count": int(r.count)}
                            for r in conn.execute(by_type)],
                "thumbs": [{"version": r.version, "up": int(r.up or 0), "down": int(r.down or 0)}
                           for r in conn.execute(thumbs)],
            }

    def traffic_stats(self, *, model: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Completions per version (``[{"version", "count", "ok"}]``, by version).

        ``model`` restricts to what clients asked for (the alias, to see how a
        canary splits its traffic); ``ok`` counts the 200s among them.
        """
        c = _COMPLETIONS.c
        conds = []
        if model is not None:
            conds.append(c.model == model)
        if since is not None:
            conds.append(c.created_at >= since)
        ok = func.sum(case((c.status_code == 200, 1), else_=0))
        q = (select(c.version, func.count().label("count"), ok.label("ok")).where(*conds)
             .group_by(c.version).order_by(c.version))
        with self._conn() as conn:  # type: ignore[attr-defined]
            return [{"version": r.version, "count": int(r.count), "ok": int(r.ok or 0)} for r in conn.execute(q)]
