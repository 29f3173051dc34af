"""The feedback table and its SQL: a mixin that ``agentloop.serve.store.Store`` inherits.

It lives apart from serve/store/db.py only to keep files small; it is still the
store layer (no other module writes feedback SQL) and follows its rules: portable
types only (JSON is ``Text``, times are ``Float`` epoch seconds), one committed
transaction per write, migrations appended to ``serve.store.db.MIGRATIONS``.

What it owns
- ``m002_feedback``: the ``feedback`` table and its indexes (registered in
  serve/store/db.py right after m001; never edit it once released).
- ``FeedbackStore``: insert/get/list/count of feedback rows, and the join with
  completions that the dataset builder (rl/datasets.py) reads.

Invariants
- ``insert_feedback`` returning means the row is committed.
- At most one row per (caller, idempotency_key) — a UNIQUE index, not a
  read-then-write, so two racing retries cannot both insert; the loser gets the
  winner's row back. NULL keys never collide (SQL NULLs are distinct).
- Lists are ordered newest first by (created_at, id): id breaks ties so a cursor
  never skips or repeats a row.

This module must never import fastapi, torch or vllm, nor serve.store (which
imports it).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from sqlalchemy import (
    Column, Connection, Float, Index, Integer, MetaData, Table, Text, and_, column, func, insert, or_,
    select, table,
)
from sqlalchemy import exc as sa_exc

from agentloop.rl.schema import FEEDBACK_TYPES  # the shared vocabulary


def _feedback_v1_columns() -> list[Column]:
    """The feedback columns as m002 created them (see _completions_v1_columns)."""
    return [
        Column("id", Text, primary_key=True),
        Column("created_at", Float, nullable=False),
        Column("caller", Text, nullable=False),
        Column("type", Text, nullable=False),
        Column("completion_id", Text),  # thumbs, rating, correction
        Column("chosen_id", Text),  # pairwise
        Column("rejected_id", Text),
        Column("chosen_index", Integer),  # choice index within an n>1 completion
        Column("rejected_index", Integer),
        Column("value", Integer),  # thumbs +1/-1, rating 1..5
        Column("correction", Text),  # JSON: the assistant message the user wanted
        Column("comment", Text),
        Column("idempotency_key", Text),
        Column("request_hash", Text),  # of the request body, to tell a retry from key reuse
        Column("version", Text),  # of the completion (the chosen one for pairwise)
        Column("conversation_hash", Text),  # of the completion, for splits and pairing
    ]


_META = MetaData()
# v1 plus the columns later migrations added: m006 (serve/store/grades.py) the reference message.
FEEDBACK = Table("feedback", _META, *_feedback_v1_columns(), Column("reference", Text))
_FB_COLUMNS = tuple(c.name for c in FEEDBACK.columns)
_FB_COLUMN_SET = frozenset(_FB_COLUMNS)
_FB_REQUIRED = ("id", "caller", "type")
_FB_JSON = ("correction", "reference")  # assistant messages

# A lightweight handle on the completions table for the dataset join. Not
# serve.store.COMPLETIONS: importing it would be circular, and the join needs
# only these columns.
_COMPLETIONS = table(
    "completions", column("id"), column("created_at"), column("caller"), column("model"),
    column("version"), column("status_code"), column("request"), column("response"),
    column("conversation_hash"),
)


def m002_feedback(conn: Connection) -> None:
    md = MetaData()
    t = Table("feedback", md, *_feedback_v1_columns())
    # The idempotency guarantee itself: see the module invariants.
    Index("ux_feedback_caller_idempotency_key", t.c.caller, t.c.idempotency_key, unique=True)
    # GET /v1/feedback is always per caller, newest first; the rest serve its filters
    # and the dataset builder's `since` scan.
    Index("ix_feedback_caller_created_at", t.c.caller, t.c.created_at)
    Index("ix_feedback_created_at", t.c.created_at)
    Index("ix_feedback_completion_id", t.c.completion_id)
    Index("ix_feedback_chosen_id", t.c.chosen_id)
    Index("ix_feedback_rejected_id", t.c.rejected_id)
    Index("ix_feedback_version", t.c.version)
    Index("ix_feedback_conversation_hash", t.c.conversation_hash)
    md.create_all(conn)


def _encode_feedback(row: dict[str, Any], now: float) -> dict[str, Any]:
    unknown = row.keys() - _FB_COLUMN_SET
    if unknown:
        raise ValueError(f"unknown feedback column(s): {sorted(unknown)}")
    missing = [k for k in _FB_REQUIRED if row.get(k) is None]
    if missing:
        raise ValueError(f"feedback row lacks required column(s): {missing}")
    if row["type"] not in FEEDBACK_TYPES:
        raise ValueError(f"unknown feedback type {row['type']!r}")
    out = dict.fromkeys(_FB_COLUMNS)
    out.update(row)
    if out["created_at"] is None:
        out["created_at"] = now
    for k in _FB_JSON:
        if out[k] is not None:
            out[k] = json.dumps(out[k], ensure_ascii=False, separators=(",", ":"))
    return out


def _decode_feedback(mapping: Any) -> dict[str, Any]:
    row = dict(mapping)
    for k in _FB_JSON:
        if row.get(k) is not None:
            row[k] = json.loads(row[k])
    return row


def _decode_completion(mapping: Any) -> dict[str, Any]:
    row = dict(mapping)
    for k in ("request", "response"):
        if row.get(k) is not None:
            row[k] = json.loads(row[k])
    return row


class FeedbackStore:
    """Feedback SQL. A mixin: ``self._conn`` comes from agentloop.serve.store.Store."""

    def insert_feedback(self, row: dict[str, Any]) -> dict[str, Any]:
        """Insert one feedback row and commit; return the stored row.

        If the row carries an ``idempotency_key`` that this caller already used,
        nothing is inserted and the existing row is returned (compare its ``id``
        with yours to tell). ``created_at`` defaults to now. Raises ValueError
        for a malformed row.
        """
        params = _encode_feedback(row, time.time())
        try:
            with self._conn(write=True) as conn:  # type: ignore[attr-defined]
                existing = self._by_key(conn, params["caller"], params["idempotency_key"])
                if existing is not None:
                    return existing
                # Only the columns set (NULL is every column's default), so a row that uses no column
                # of a later migration also fits a database one migration behind.
                conn.execute(insert(FEEDBACK).values(**{k: v for k, v in params.items() if v is not None}))
        except sa_exc.IntegrityError:
            # The pre-check above is enough on SQLite (BEGIN IMMEDIATE serialises
            # writers); elsewhere a concurrent retry can win between check and
            # insert, and the unique index makes ours fail instead of duplicating.
            with self._conn() as conn:  # type: ignore[attr-defined]
                existing = self._by_key(conn, params["caller"], params["idempotency_key"])
                if existing is None:
                    # Same id inserted twice (a retried call): harmless, like completions.
                    got = conn.execute(select(FEEDBACK).where(FEEDBACK.c.id == params["id"])).mappings().first()
                    existing = None if got is None else _decode_feedback(got)
            if existing is None:
                raise
            return existing
        return _decode_feedback(params)

    @staticmethod
    def _by_key(conn: Connection, caller: str, key: str | None) -> dict[str, Any] | None:
        if key is None:
            return None
        f = FEEDBACK.c
        got = conn.execute(select(FEEDBACK).where(f.caller == caller, f.idempotency_key == key)).mappings().first()
        return None if got is None else _decode_feedback(got)

    def get_feedback(self, id: str) -> dict[str, Any] | None:
        with self._conn() as conn:  # type: ignore[attr-defined]
            got = conn.execute(select(FEEDBACK).where(FEEDBACK.c.id == id)).mappings().first()
        return None if got is None else _decode_feedback(got)

    def get_feedback_by_key(self, caller: str, idempotency_key: str) -> dict[str, Any] | None:
        """The row this caller stored with this idempotency key, if any."""
        with self._conn() as conn:  # type: ignore[attr-defined]
            return self._by_key(conn, caller, idempotency_key)

    @staticmethod
    def _feedback_where(caller: str | None, type: str | None, completion_id: str | None,
                        version: str | None, since: float | None) -> list:
        f = FEEDBACK.c
        conds = []
        if caller is not None:
            conds.append(f.caller == caller)
        if type is not None:
            conds.append(f.type == type)
        if completion_id is not None:
            # A pairwise choice is feedback on both of its completions.
            conds.append(or_(f.completion_id == completion_id, f.chosen_id == completion_id,
                             f.rejected_id == completion_id))
        if version is not None:
            conds.append(f.version == version)
        if since is not None:
            conds.append(f.created_at >= since)
        return conds

    def list_feedback(self, *, caller: str | None = None, type: str | None = None,
                      completion_id: str | None = None, version: str | None = None,
                      since: float | None = None, after: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        """Rows matching every given filter, newest first (``since`` is inclusive).

        ``after`` is a cursor: the id of a row from a previous page; the rows
        strictly older than it (in list order) are returned. Raises KeyError if
        the cursor row does not exist (or is not ``caller``'s), ValueError for a
        negative limit.
        """
        if limit < 0:
            raise ValueError("limit must be >= 0")
        f = FEEDBACK.c
        conds = self._feedback_where(caller, type, completion_id, version, since)
        with self._conn() as conn:  # type: ignore[attr-defined]
            if after is not None:
                cur = select(f.created_at, f.id).where(f.id == after)
                if caller is not None:
                    cur = cur.where(f.caller == caller)  # a cursor must not reveal others' rows
                got = conn.execute(cur).first()
                if got is None:
                    raise KeyError(after)
                # Written out rather than a row-value comparison: same meaning, any backend.
                conds.append(or_(f.created_at < got.created_at,
                                 and_(f.created_at == got.created_at, f.id < got.id)))
            stmt = select(FEEDBACK).where(*conds).order_by(f.created_at.desc(), f.id.desc()).limit(limit)
            return [_decode_feedback(m) for m in conn.execute(stmt).mappings()]

    def count_feedback(self, *, caller: str | None = None, type: str | None = None,
                       completion_id: str | None = None, version: str | None = None,
                       since: float | None = None) -> int:
        stmt = select(func.count()).select_from(FEEDBACK).where(
            *self._feedback_where(caller, type, completion_id, version, since))
        with self._conn() as conn:  # type: ignore[attr-defined]
            return int(conn.execute(stmt).scalar_one())

    def iter_feedback_with_completions(self, *, since: float | None = None,
                                       batch_size: int = 500) -> Iterator[dict[str, Any]]:
        """Every feedback row, oldest first, with the completions it refers to.

        Each yielded row is a feedback row plus ``completion`` (for thumbs,
        rating, correction) or ``chosen_completion`` and ``rejected_completion``
        (pairwise): the decoded completions row, or None if it is gone. Reads in
        keyset pages of ``batch_size`` (one short transaction each), so a long
        consumer never holds a read transaction open.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        f, c = FEEDBACK.c, _COMPLETIONS.c
        cursor: tuple[float, str] | None = None
        while True:
            conds = [] if since is None else [f.created_at >= since]
            if cursor is not None:
                conds.append(or_(f.created_at > cursor[0], and_(f.created_at == cursor[0], f.id > cursor[1])))
            with self._conn() as conn:  # type: ignore[attr-defined]
                page = [_decode_feedback(m) for m in conn.execute(
                    select(FEEDBACK).where(*conds).order_by(f.created_at, f.id).limit(batch_size)).mappings()]
                ids = {i for r in page for i in (r["completion_id"], r["chosen_id"], r["rejected_id"]) if i}
                completions = {m["id"]: _decode_completion(m) for m in conn.execute(
                    select(_COMPLETIONS).where(c.id.in_(sorted(ids)))).mappings()} if ids else {}
            for r in page:
                if r["type"] == "pairwise":
                    r["chosen_completion"] = completions.get(r["chosen_id"])
                    r["rejected_completion"] = completions.get(r["rejected_id"])
                else:
                    r["completion"] = completions.get(r["completion_id"])
                yield r
            if len(page) < batch_size:
                return
            cursor = (page[-1]["created_at"], page[-1]["id"])
