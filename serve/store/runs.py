"""Training runs and their per-step metrics: a mixin that ``agentloop.serve.store.Store`` inherits.

Part of the store layer (all SQL lives in serve/store/), kept apart only to
keep files small. Portable types only (JSON as Text, times as Float epoch).

What it owns
- ``m003_runs``: tables ``training_runs`` (one row per loop iteration, with its
  status, dataset stats, gate numbers and resulting version) and
  ``run_metrics`` (one row per logged training step).
- ``RunStore``: create/update/get/list runs, append/read metrics.

Invariants
- At most one run is active (queued or running) at a time: ``create_run``
  checks and inserts inside one write transaction (SQLite: BEGIN IMMEDIATE),
  so two schedulers or two admin calls can never start two trainings.
- Run state lives only here, so a restarted gateway or a separate loop
  worker sees the same history; ``fail_orphaned_runs`` closes runs whose
  owner process died.

Never imports fastapi, torch or vllm, nor serve.store.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from sqlalchemy import (
    Column, Connection, Float, Index, Integer, MetaData, Table, Text, column, func, insert, select, table, update,
)

from agentloop.rl.schema import ACTIVE_RUN_STATUSES as ACTIVE, RUN_STATUSES  # the shared vocabulary

_JSON_COLUMNS = ("params", "dataset", "gate", "result")

_META = MetaData()


def _runs_v1(md: MetaData) -> Table:
    return Table(
        "training_runs", md,
        Column("id", Text, primary_key=True),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
        Column("status", Text, nullable=False),
        Column("trigger", Text, nullable=False),   # "admin" | "scheduler"
        Column("method", Text, nullable=False),    # "dpo" | "kto"
        Column("promote", Integer, nullable=False),  # 1: promote if the gate passes
        Column("params", Text),                    # JSON: training config overrides
        Column("dataset", Text),                   # JSON: stats, sizes, feedback watermark
        Column("gate", Text),                      # JSON: the gate's numbers and verdict
        Column("result", Text),                    # JSON: training result summary
        Column("version", Text),                   # the candidate version it produced
        Column("parent", Text),                    # the version it continued from
        Column("reason", Text),                    # why it ended as it did
        Column("owner", Text),                     # "host:pid" of the process running it
    )


def _metrics_v1(md: MetaData) -> Table:
    return Table(
        "run_metrics", md,
        Column("run_id", Text, nullable=False),
        Column("step", Integer, nullable=False),
        Column("at", Float, nullable=False),
        Column("data", Text, nullable=False),      # JSON: loss, rewards/*, kl, ...
    )


RUNS = _runs_v1(_META)
RUN_METRICS = _metrics_v1(_META)


def m003_runs(conn: Connection) -> None:
    md = MetaData()
    runs, metrics = _runs_v1(md), _metrics_v1(md)
    Index("ix_training_runs_created_at", runs.c.created_at)
    Index("ix_training_runs_status", runs.c.status)
    Index("ix_run_metrics_run_step", metrics.c.run_id, metrics.c.step)
    md.create_all(conn)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _decode(row: Any) -> dict[str, Any]:
    d = dict(row._mapping)
    for k in _JSON_COLUMNS:
        if d.get(k) is not None:
            d[k] = json.loads(d[k])
    d["promote"] = bool(d["promote"])
    return d


class ActiveRunExists(Exception):
    """A training run is already queued or running."""

    def __init__(self, run: dict[str, Any]):
        super().__init__(f"training run {run['id']} is already {run['status']}")
        self.run = run


class RunStore:
    def create_run(self, *, method: str, trigger: str, promote: bool = True,
                   params: dict | None = None) -> dict[str, Any]:
        """Insert a queued run, unless one is active (then ActiveRunExists)."""
        now = time.time()
        row = {"id": f"run-{uuid.uuid4().hex[:16]}", "created_at": now, "updated_at": now, "status": "queued",
               "trigger": trigger, "method": method, "promote": int(promote),
               "params": json.dumps(params or {}), "owner": owner_id()}
        with self._conn(write=True) as conn:
            active = conn.execute(select(RUNS).where(RUNS.c.status.in_(ACTIVE)).limit(1)).first()
            if active is not None:
                raise ActiveRunExists(_decode(active))
            conn.execute(insert(RUNS).values(**row))
        return self.get_run(row["id"])

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"unknown run status {fields['status']!r}")
        for k in _JSON_COLUMNS:
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k], ensure_ascii=False, default=str)
        if "promote" in fields:
            fields["promote"] = int(fields["promote"])
        fields["updated_at"] = time.time()
        with self._conn(write=True) as conn:
            conn.execute(update(RUNS).where(RUNS.c.id == run_id).values(**fields))
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self._conn() as conn:
            row = conn.execute(select(RUNS).where(RUNS.c.id == run_id)).first()
        return _decode(row) if row is not None else None

    def list_runs(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = select(RUNS).order_by(RUNS.c.created_at.desc(), RUNS.c.id.desc()).limit(limit)
        if status is not None:
            q = q.where(RUNS.c.status == status)
        with self._conn() as conn:
            return [_decode(r) for r in conn.execute(q)]

    def active_run(self) -> dict[str, Any] | None:
        with self._conn() as conn:
            row = conn.execute(select(RUNS).where(RUNS.c.status.in_(ACTIVE)).limit(1)).first()
        return _decode(row) if row is not None else None

    def fail_orphaned_runs(self, alive: Any) -> list[str]:
        """Mark active runs whose owner is not alive (`alive(owner) -> bool`) as failed."""
        failed = []
        for run in self.list_runs(limit=1000):
            if run["status"] in ACTIVE and not alive(run.get("owner") or ""):
                self.update_run(run["id"], status="failed", reason="interrupted: its process is gone")
                failed.append(run["id"])
        return failed

    def oldest_feedback_time(self) -> float | None:
        """When the first feedback arrived (the scheduler's clock before any run)."""
        fb = table("feedback", column("created_at"))
        with self._conn() as conn:
            return conn.execute(select(func.min(fb.c.created_at))).scalar()

    def add_run_metrics(self, run_id: str, step: int, data: dict[str, Any]) -> None:
        with self._conn(write=True) as conn:
            conn.execute(insert(RUN_METRICS).values(run_id=run_id, step=int(step), at=time.time(),
                                                     data=json.dumps(data, default=float)))

    def run_metrics(self, run_id: str) -> list[dict[str, Any]]:
        q = select(RUN_METRICS).where(RUN_METRICS.c.run_id == run_id).order_by(RUN_METRICS.c.step, RUN_METRICS.c.at)
        with self._conn() as conn:
            return [{"step": r.step, "at": r.at, **json.loads(r.data)} for r in conn.execute(q)]
