"""The store: every byte agentloop persists about completions, and all of its SQL.

What it owns
- ``Store``: a synchronous SQLAlchemy 2 Core engine on any SQLAlchemy URL
  (``sqlite:///path/agentloop.db`` by default, ``postgresql+psycopg://...`` works
  too), the schema, and every query. Only portable types are used: JSON payloads
  are ``Text`` written with ``json.dumps``, times are ``Float`` epoch seconds.
- ``MIGRATIONS``: an ordered list of functions (the simonw/llm pattern). Each one
  runs once per database, in its own transaction, and is recorded by name in
  ``_migrations``. Never edit a released migration: append a new one.
- ``LogWriter``: the write path. The gateway hands it rows; a daemon thread
  writes them in batches so logging never sits on the HTTP response path.
- Feedback SQL (table ``feedback``, migration m002) is in serve/store_feedback.py,
  a mixin ``Store`` inherits: same layer, split only for file size.

Invariants
- A row acknowledged by ``LogWriter.flush()`` returning True (or written by
  ``Store.insert_completions`` returning) is committed: with SQLite in WAL mode
  and ``synchronous=NORMAL`` it survives a process crash (an OS crash or power
  loss may lose the last commits, which is the NORMAL trade-off).
- A process crash loses only rows the LogWriter holds in memory: queued (at
  most ``maxsize``), in the batch being written, waiting in ``asubmit`` for
  queue space, or in ``failed_rows``. Call ``close()`` on shutdown.
- Rows are never dropped silently: a write that keeps failing leaves its rows in
  ``failed_rows``, retried on every flush and on close, and logged.
- Inserting an id that exists is a no-op, so retries are harmless.

This module must never import fastapi, torch or vllm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import (
    Boolean, Column, Connection, Float, Index, Integer, MetaData, Table, Text,
    create_engine, event, func, insert, inspect, select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from agentloop.serve.store.feedback import FeedbackStore, m002_feedback
from agentloop.serve.store.runs import RunStore, m003_runs
from agentloop.serve.store.keys import KeyStore, m004_api_keys
from agentloop.serve.store.stats import StatsStore

logger = logging.getLogger("agentloop.store")

# ---------------------------------------------------------------- schema

def _completions_v1_columns() -> list[Column]:
    """The completions columns as m001 created them.

    A function, not a shared Table, because Column objects belong to one table:
    m001 builds its own frozen copy, and COMPLETIONS below is "v1 plus whatever
    later migrations add", so a fresh database never gets a column early.
    """
    return [
        Column("id", Text, primary_key=True),
        Column("created_at", Float, nullable=False),
        Column("caller", Text, nullable=False),
        Column("model", Text, nullable=False),  # the alias the client asked for
        Column("served_model", Text),  # engine model name, e.g. agentloop@v0000
        Column("version", Text),
        Column("stream", Boolean, nullable=False),
        Column("status_code", Integer, nullable=False),
        Column("error", Text),
        Column("latency_ms", Float),
        Column("ttft_ms", Float),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("finish_reason", Text),
        Column("request", Text, nullable=False),  # JSON
        Column("response", Text),  # JSON: the final response, a stream assembled
        Column("conversation_hash", Text),  # hash of messages+tools, for splits
    ]


_META = MetaData()
COMPLETIONS = Table("completions", _META, *_completions_v1_columns())
MIGRATIONS_TABLE = Table(
    "_migrations", _META,
    Column("name", Text, primary_key=True),
    Column("applied_at", Float),
)
_COLUMNS = tuple(c.name for c in COMPLETIONS.columns)
_COLUMN_SET = frozenset(_COLUMNS)
_JSON_COLUMNS = ("request", "response")
# created_at is required by the schema but defaults to "now" on insert.
_REQUIRED = ("id", "caller", "model", "stream", "status_code", "request")

# ---------------------------------------------------------------- migrations

MIGRATIONS: list[Callable[[Connection], None]] = []
migration = MIGRATIONS.append


@migration
def m001_completions(conn: Connection) -> None:
    md = MetaData()
    t = Table("completions", md, *_completions_v1_columns())
    Index("ix_completions_created_at", t.c.created_at)
    Index("ix_completions_caller", t.c.caller)
    Index("ix_completions_model_version", t.c.model, t.c.version)
    Index("ix_completions_conversation_hash", t.c.conversation_hash)
    md.create_all(conn)


migration(m002_feedback)  # defined with the rest of the feedback SQL
migration(m003_runs)  # training runs and their metrics (serve/store_runs.py)
migration(m004_api_keys)  # user API keys, hashed (serve/store_keys.py)


# ---------------------------------------------------------------- store

# Execution option read by the SQLite "begin" hook: writers take the write lock
# up front. A deferred transaction that reads and then writes can fail with
# SQLITE_BUSY at the upgrade without waiting on busy_timeout; IMMEDIATE waits.
_IMMEDIATE = "agentloop_begin_immediate"


def check_row(row: dict[str, Any]) -> None:
    """Raise ValueError if ``row`` cannot be a completions row.

    Called where a row enters (submit, insert) so a programming error surfaces
    at its call site instead of as a poison batch in the background writer.
    """
    unknown = row.keys() - _COLUMN_SET
    if unknown:
        raise ValueError(f"unknown completions column(s): {sorted(unknown)}")
    missing = [k for k in _REQUIRED if row.get(k) is None]
    if missing:
        raise ValueError(f"completions row lacks required column(s): {missing}")


def _dumps(value: Any) -> str:
    # default=str: a log row must not be lost because some value in a request
    # is not JSON-serialisable; its string form is better than nothing.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _encode(row: dict[str, Any], now: float) -> dict[str, Any]:
    check_row(row)
    # Every parameter set must carry every column: executemany compiles the
    # statement once, from the first row's keys.
    out = dict.fromkeys(_COLUMNS)
    out.update(row)
    if out["created_at"] is None:
        out["created_at"] = now
    out["stream"] = bool(out["stream"])
    for k in _JSON_COLUMNS:
        if out[k] is not None:
            out[k] = _dumps(out[k])
    return out


def _decode(mapping: Any) -> dict[str, Any]:
    row = dict(mapping)
    for k in _JSON_COLUMNS:
        if row.get(k) is not None:
            row[k] = json.loads(row[k])
    return row


class Store(FeedbackStore, RunStore, StatsStore, KeyStore):
    """All SQL agentloop runs. Thread-safe: share one instance per process."""

    def __init__(self, url: str):
        self.url = url
        u = make_url(url)
        self.dialect = u.get_backend_name()
        self._is_sqlite = self.dialect == "sqlite"
        kwargs: dict[str, Any] = {}
        memory = self._is_sqlite and u.database in (None, "", ":memory:")
        if memory:
            # One in-memory database must be seen by every thread (the LogWriter
            # writes from its own): share one connection, and serialise its use
            # with a lock since a sqlite3 connection has a single transaction.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif self._is_sqlite and not (u.query.get("uri") or u.database.startswith("file:")):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        self._mem_lock = threading.RLock() if memory else nullcontext()
        self.engine = create_engine(url, **kwargs)
        if self._is_sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        try:
            # Names applied by this instance; empty when the database was current.
            self.applied: list[str] = _retry_busy(self.migrate) if self._is_sqlite else self.migrate()
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, url: str) -> "Store":
        return cls(url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _conn(self, *, write: bool = False) -> Iterator[Connection]:
        """A connection in a transaction, committed on success."""
        with self._mem_lock, self.engine.connect() as conn:
            if write and self._is_sqlite:
                conn.execution_options(**{_IMMEDIATE: True})
            with conn.begin():
                yield conn

    # ------------------------------------------------------------ migrations

    def migrate(self) -> list[str]:
        """Apply pending migrations in order; return the names applied now."""
        names = [fn.__name__ for fn in MIGRATIONS]
        if len(set(names)) != len(names):
            raise RuntimeError(f"duplicate migration names in {names}")
        done = set(self.schema_version())
        applied = []
        # The unlocked read above lets an up-to-date database open without
        # taking the write lock; _apply_once re-checks under the lock.
        for fn in MIGRATIONS:
            if fn.__name__ not in done and self._apply_once(fn):
                applied.append(fn.__name__)
        if applied:
            logger.info("store %s: applied migrations %s", self.engine.url, applied)
        return applied

    def _apply_once(self, fn: Callable[[Connection], None]) -> bool:
        name = fn.__name__
        for attempt in (1, 2):
            try:
                # SQLite: BEGIN IMMEDIATE holds the write lock from the check to
                # the commit, so a concurrent opener waits and then sees the row.
                with self._conn(write=True) as conn:
                    MIGRATIONS_TABLE.create(conn, checkfirst=True)
                    seen = conn.execute(
                        select(MIGRATIONS_TABLE.c.name).where(MIGRATIONS_TABLE.c.name == name)
                    ).first()
                    if seen:
                        return False
                    fn(conn)
                    conn.execute(insert(MIGRATIONS_TABLE).values(name=name, applied_at=time.time()))
                return True
            except sa_exc.DBAPIError:
                # Other backends have no BEGIN IMMEDIATE: a concurrent migrator
                # makes our DDL or the primary-key insert fail and our
                # transaction roll back. Re-check once; raise if not that.
                if attempt == 2:
                    raise
                logger.info("migration %s failed, re-checking (concurrent opener?)", name)
        raise AssertionError("unreachable")

    def schema_version(self) -> list[str]:
        """Names of the applied migrations, in the order they were applied."""
        with self._conn() as conn:
            if not inspect(conn).has_table(MIGRATIONS_TABLE.name):
                return []
            t = MIGRATIONS_TABLE
            return list(conn.execute(select(t.c.name).order_by(t.c.applied_at, t.c.name)).scalars())

    # ------------------------------------------------------------ completions

    def insert_completions(self, rows: list[dict[str, Any]]) -> None:
        """Insert rows in one transaction; a row whose id exists is skipped.

        ``request``/``response`` are Python values, stored as JSON text;
        ``created_at`` defaults to now. Raises ValueError for a malformed row.
        """
        if not rows:
            return
        now = time.time()
        params = [_encode(r, now) for r in rows]
        with self._conn(write=True) as conn:
            if self.dialect in ("sqlite", "postgresql"):
                dialect_insert = sqlite_insert if self._is_sqlite else pg_insert
                stmt = dialect_insert(COMPLETIONS).on_conflict_do_nothing(index_elements=["id"])
                conn.execute(stmt, params)
                return
            # Portable fallback: drop ids already stored or repeated in the batch.
            # A concurrent writer of the same id still makes this raise
            # IntegrityError; the LogWriter then retries row by row.
            ids = [p["id"] for p in params]
            existing = set(conn.execute(select(COMPLETIONS.c.id).where(COMPLETIONS.c.id.in_(ids))).scalars())
            fresh = []
            for p in params:
                if p["id"] not in existing:
                    existing.add(p["id"])
                    fresh.append(p)
            if fresh:
                conn.execute(insert(COMPLETIONS), fresh)

    def get_completion(self, id: str) -> dict[str, Any] | None:
        with self._conn() as conn:
            row = conn.execute(select(COMPLETIONS).where(COMPLETIONS.c.id == id)).mappings().first()
        return None if row is None else _decode(row)

    @staticmethod
    def _where(caller: str | None, model: str | None, version: str | None, since: float | None) -> list:
        c = COMPLETIONS.c
        conds = []
        if caller is not None:
            conds.append(c.caller == caller)
        if model is not None:
            conds.append(c.model == model)
        if version is not None:
            conds.append(c.version == version)
        if since is not None:
            conds.append(c.created_at >= since)
        return conds

    def list_completions(self, *, caller: str | None = None, model: str | None = None,
                         version: str | None = None, since: float | None = None,
                         limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Rows matching every given filter, newest first (``since`` is inclusive)."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        c = COMPLETIONS.c
        stmt = (select(COMPLETIONS).where(*self._where(caller, model, version, since))
                # id breaks ties so pages are stable when created_at collides.
                .order_by(c.created_at.desc(), c.id.desc()).limit(limit).offset(offset))
        with self._conn() as conn:
            return [_decode(m) for m in conn.execute(stmt).mappings()]

    def count_completions(self, *, caller: str | None = None, model: str | None = None,
                          version: str | None = None, since: float | None = None) -> int:
        stmt = select(func.count()).select_from(COMPLETIONS).where(*self._where(caller, model, version, since))
        with self._conn() as conn:
            return int(conn.execute(stmt).scalar_one())


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN (see _sqlite_on_begin) instead of the sqlite3
    # module, whose legacy mode skips BEGIN before DDL, so migrations would not
    # be transactional. This also keeps the PRAGMAs below out of a transaction.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        # busy_timeout first: switching a fresh file to WAL needs a lock that a
        # concurrent opener may hold.
        cur.execute("PRAGMA busy_timeout = 5000")
        _retry_busy(lambda: cur.execute("PRAGMA journal_mode = WAL"))  # readers never block the writer
        cur.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL; far fewer fsyncs
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def _retry_busy(fn: Callable[[], Any], attempts: int = 6) -> Any:
    """Run fn, retrying briefly while SQLite says "database is locked".

    SQLite answers SQLITE_BUSY without waiting on busy_timeout in a few cases
    (sqlite.org/wal.html, "Sometimes Queries Return SQLITE_BUSY In WAL Mode"):
    while the last connection to close checkpoints and deletes the WAL, and when
    a fresh file is switched to WAL under a concurrent opener. Both only happen
    as stores open and close concurrently, so opening retries; queries do not.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # sqlite3's or SQLAlchemy's OperationalError
            if attempt == attempts - 1 or "database is locked" not in str(e):
                raise
            time.sleep(0.02 * 2 ** attempt)


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# ---------------------------------------------------------------- log writer

class _Flush:
    """A marker put in the queue by flush(): every row ahead of it is older."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False


_WAKE = object()  # put by close() so the worker notices promptly


def _is_data_error(exc: BaseException) -> bool:
    """True if retrying the same rows cannot help (bad data, not a busy/down DB)."""
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, ValueError, TypeError)):
        return True
    # StatementError that is not a DBAPIError: a bind parameter failed to convert.
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)


class LogWriter:
    """Bounded background writer of completions rows into a Store.

    One daemon thread is the only writer: it takes rows from a bounded queue and
    inserts up to ``batch_size`` of them at a time, waiting at most
    ``flush_interval`` seconds after the first row of a batch for more.
    Counters: ``written`` rows committed (an id that already existed counts as
    written), ``failures`` failed insert attempts, ``rejected`` submit() calls
    refused, ``throttled`` asubmit() calls that had to wait for queue space,
    ``pending`` rows accepted but not yet committed (queued, in flight, or in
    ``failed_rows``). The caller owns the store and closes it after close().
    """

    def __init__(self, store: Store, *, maxsize: int = 10_000, batch_size: int = 256,
                 flush_interval: float = 0.5, max_retries: int = 3, retry_backoff: float = 0.1):
        if maxsize < 1 or batch_size < 1 or flush_interval <= 0 or max_retries < 0:
            # maxsize 0 would make queue.Queue unbounded: the bound is the point.
            raise ValueError("need maxsize >= 1, batch_size >= 1, flush_interval > 0, max_retries >= 0")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._q: queue.Queue = queue.Queue(maxsize)
        self._lock = threading.Lock()  # guards counters, _closed and _blocked_puts
        self._closed = False
        self._blocked_puts = 0  # asubmit rows waiting in a thread for queue space
        self._accepted = 0
        self.written = 0
        self.failures = 0
        self.rejected = 0
        self.throttled = 0
        self._failed: list[dict[str, Any]] = []  # dead letters; only the worker touches it while alive
        self._thread = threading.Thread(target=self._run, name="agentloop-logwriter", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producers

    def submit(self, row: dict[str, Any]) -> bool:
        """Queue ``row`` without blocking; False if the queue is full or closed.

        The row is copied shallowly: do not mutate nested values afterwards.
        Raises ValueError for a malformed row.
        """
        row = dict(row)
        check_row(row)
        with self._lock:
            if not self._closed:
                try:
                    self._q.put_nowait(row)
                except queue.Full:
                    pass
                else:
                    self._accepted += 1
                    return True
            self.rejected += 1
            return False

    async def asubmit(self, row: dict[str, Any]) -> None:
        """Queue ``row`` from asyncio, waiting (off the event loop) while full.

        Never drops the row; raises RuntimeError if the writer is closed.
        """
        row = dict(row)
        check_row(row)
        with self._lock:
            if self._closed:
                raise RuntimeError("LogWriter is closed")
            self._accepted += 1
            try:
                self._q.put_nowait(row)
                return
            except queue.Full:
                # Counted under the same lock that close() takes, so the worker
                # cannot stop while this row is still on its way in.
                self._blocked_puts += 1
                self.throttled += 1
        # to_thread cannot be cancelled: if our task is, the put still happens.
        await asyncio.to_thread(self._blocking_put, row)

    def _blocking_put(self, row: dict[str, Any]) -> None:
        try:
            self._q.put(row)
        finally:
            with self._lock:
                self._blocked_puts -= 1

    # ------------------------------------------------------------ control

    @property
    def pending(self) -> int:
        with self._lock:
            return self._accepted - self.written

    @property
    def failed_rows(self) -> list[dict[str, Any]]:
        """A snapshot of the dead-letter rows awaiting retry."""
        return list(self._failed)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row submitted before this call is committed.

        False on timeout or if some rows are still in ``failed_rows`` after a
        retry. Call it from a thread, not the event loop: it blocks.
        """
        if not self._thread.is_alive():
            return self.pending == 0
        deadline = time.monotonic() + timeout
        marker = _Flush()
        try:
            self._q.put(marker, timeout=max(timeout, 0.0))
        except queue.Full:
            return False
        if not marker.event.wait(max(deadline - time.monotonic(), 0.0)):
            return False
        return marker.ok

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting rows, write everything queued, stop the thread. Idempotent."""
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            try:
                self._q.put_nowait(_WAKE)
            except queue.Full:
                pass  # a full queue keeps the worker busy anyway
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("LogWriter did not drain within %.1fs; %d rows pending", timeout, self.pending)
        elif self._failed:
            logger.error("LogWriter closed with %d rows it could not write (see failed_rows)", len(self._failed))

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            batch: list[dict[str, Any]] = []
            marker: _Flush | None = None
            try:
                marker = self._collect(batch)
                if batch:
                    self._write(batch)
                if marker is not None:
                    marker.ok = self._retry_failed()
            except Exception:  # noqa: BLE001 - the thread must survive anything
                logger.exception("LogWriter loop error; keeping %d rows for retry", len(batch))
                # Skip rows _write already kept: a row written twice would count twice.
                kept = {id(r) for r in self._failed}
                self._failed.extend(r for r in batch if id(r) not in kept)
            finally:
                if marker is not None:
                    marker.event.set()  # ok stays False on error
            with self._lock:
                # _blocked_puts before empty(): once it is 0 after close, no put
                # can still arrive, so an empty queue is final.
                done = self._closed and self._blocked_puts == 0
            if done and self._q.empty():
                break
        self._retry_failed()

    def _collect(self, batch: list[dict[str, Any]]) -> _Flush | None:
        """Fill ``batch``; return a flush marker if one ended the batch."""
        try:
            item = self._q.get(timeout=self.flush_interval)
        except queue.Empty:
            return None
        deadline = time.monotonic() + self.flush_interval
        while True:
            if isinstance(item, _Flush):
                return item
            if item is _WAKE:
                return None  # closing: write what we have now
            batch.append(item)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.batch_size or remaining <= 0:
                return None
            try:
                item = self._q.get(timeout=remaining)
            except queue.Empty:
                return None

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        """Insert ``rows`` with retries; on final failure keep them in _failed."""
        attempt = 0
        while True:
            try:
                self.store.insert_completions(rows)
            except Exception as exc:  # noqa: BLE001 - any failure must keep the rows
                with self._lock:
                    self.failures += 1
                if _is_data_error(exc):
                    if len(rows) > 1:
                        # Retrying the batch cannot help: isolate the bad rows so
                        # the good ones land (list, not generator: try every row).
                        return all([self._write([r]) for r in rows])
                    logger.error("LogWriter: row %r rejected: %s", rows[0].get("id"), exc)
                    break
                attempt += 1
                if attempt > self.max_retries:
                    logger.error("LogWriter: %d rows failed %d times, kept for retry: %s",
                                 len(rows), attempt, exc)
                    break
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            else:
                with self._lock:
                    self.written += len(rows)
                return True
        self._failed.extend(rows)
        return False

    def _retry_failed(self) -> bool:
        """Retry the dead letters once (with the usual retries); True if none remain."""
        rows, self._failed = self._failed, []
        for i in range(0, len(rows), self.batch_size):
            before = self.written  # only this thread increments it
            if not self._write(rows[i:i + self.batch_size]) and self.written == before:
                # Nothing landed: the store is still down, do not hammer it with
                # the rest. (If some rows landed, only bad rows failed: go on.)
                self._failed.extend(rows[i + self.batch_size:])
                break
        return not self._failed
