"""The store: every byte agentloop persists about completions, and all of its SQL.

What it owns
- ``Store``: a synchronous SQLAlchemy 2 Core engine on any SQLAlchemy URL
  (``sqlite:///path/agentloop.db`` by default, ``postgresql+psycopg://...`` works
  too), the schema, and every query. Only portable types are used: JSON payloads
  are ``Text`` written with ``json.dumps``, times are ``Float`` epoch seconds.
- ``MIGRATIONS``: an ordered list of functions (the simonw/llm pattern). Each one
  runs once per database, in its own transaction, and is recorded by name in
  ``_migrations``. Never edit a released migration: append a new one.
- The write path, ``LogWriter``, is serve/store/logwriter.py.
- Feedback SQL (table ``feedback``, migration m002) is in serve/store/feedback.py,
  a mixin ``Store`` inherits: same layer, split only for file size. Runs (m003),
  keys (m004), the served state of every gateway (m005) and grades (m006) likewise.

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
- A database that cannot be reached is ``StoreUnavailable`` (serve/errors.py: a 503 with
  Retry-After at the HTTP edge), raised within the connect timeout (PostgreSQL:
  ``connect_timeout``, default 5 s) or the pool timeout; a statement's own error (bad data,
  a constraint) stays the driver's. Pooled PostgreSQL connections are pinged before use,
  so after a server restart the store reconnects by itself on the next call.

This module must never import fastapi, torch or vllm.
"""

from __future__ import annotations

import json
import logging
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

from agentloop.serve.errors import StoreUnavailable
from agentloop.serve.store.feedback import FeedbackStore, m002_feedback
from agentloop.serve.store.runs import RunStore, m003_runs
from agentloop.serve.store.keys import KeyStore, m004_api_keys
from agentloop.serve.store.served import ServedStore, m005_served
from agentloop.serve.store.grades import GradeStore, m006_grades
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
migration(m003_runs)  # training runs and their metrics (serve/store/runs.py)
migration(m004_api_keys)  # user API keys, hashed (serve/store/keys.py)
migration(m005_served)  # what every gateway serves, and which versions each holds (serve/store/served.py)
migration(m006_grades)  # reference feedback's message, and graders' grades (serve/store/grades.py)


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


class Store(FeedbackStore, RunStore, StatsStore, KeyStore, ServedStore, GradeStore):
    """All SQL agentloop runs. Thread-safe: share one instance per process."""

    def __init__(self, url: str, *, connect_timeout: int = 5, pool_size: int = 5, pool_timeout: float = 10.0):
        """`connect_timeout` (seconds, PostgreSQL; a `connect_timeout` in the URL wins),
        `pool_size` connections kept per process (as many again may open under load) and
        `pool_timeout` seconds a call waits for a free one: a server-backed database only."""
        self.url = url
        self._connect_timeout = max(1, int(connect_timeout))
        u = make_url(url)
        self.dialect = u.get_backend_name()
        self._is_sqlite = self.dialect == "sqlite"
        kwargs: dict[str, Any] = {}
        if not self._is_sqlite:
            # pre_ping: a connection the server dropped (a restart) is replaced on checkout
            # instead of failing the call that drew it.
            kwargs.update(pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, pool_timeout=pool_timeout)
            if self.dialect == "postgresql" and "connect_timeout" not in u.query:
                kwargs["connect_args"] = {"connect_timeout": max(1, int(connect_timeout))}
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
        self.close_listener()
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _conn(self, *, write: bool = False) -> Iterator[Connection]:
        """A connection in a transaction, committed on success. A database that cannot be
        reached, or a connection lost mid-way, is StoreUnavailable; other errors pass as they are."""
        with self._mem_lock:
            try:
                conn = self.engine.connect()
            except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as e:
                raise _unavailable(self, e) from e
            with conn:
                try:
                    if write and self._is_sqlite:
                        conn.execution_options(**{_IMMEDIATE: True})
                    with conn.begin():
                        yield conn
                except sa_exc.DBAPIError as e:
                    if e.connection_invalidated or isinstance(e, sa_exc.InterfaceError):
                        raise _unavailable(self, e) from e
                    raise

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

    def completions_of_conversation(self, caller: str, conversation_hash: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """`caller`'s completions of one conversation (messages and tools), newest first."""
        c = COMPLETIONS.c
        stmt = (select(COMPLETIONS).where(c.caller == caller, c.conversation_hash == conversation_hash)
                .order_by(c.created_at.desc(), c.id.desc()).limit(limit))
        with self._conn() as conn:
            return [_decode(m) for m in conn.execute(stmt).mappings()]


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


def _unavailable(store: "Store", e: BaseException) -> StoreUnavailable:
    # The driver's words go to the log, not to clients: they may name hosts and users.
    logger.warning("store %s unavailable: %s", store.engine.url, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return StoreUnavailable()


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
        except Exception as e:  # sqlite3's or SQLAlchemy's OperationalError (or ours, caused by one)
            if attempt == attempts - 1 or "database is locked" not in f"{e} {e.__cause__}":
                raise
            time.sleep(0.02 * 2 ** attempt)


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
