"""What every gateway serves: the served state of an alias, and which versions each gateway holds.

Part of the store layer (a mixin ``agentloop.serve.store.Store`` inherits), kept apart
only to keep files small.

What it owns
- ``m005_served``: table ``served_state`` (one row per alias: the live version, the
  canary and its share, a ``generation`` that grows by one with every change, who
  changed it, why and when) and table ``served_holds`` (which versions each gateway
  still routes to, refreshed as a heartbeat).
- ``ServedStore``: read, initialise and change the state; wait for a change (PostgreSQL:
  LISTEN/NOTIFY, SQLite: a short poll); record holds and release one.

Invariants
- A change (promotion, rollback, canary) is one transaction: the row and its new
  generation are written together, and on PostgreSQL the notification is sent by that
  transaction, so it is delivered only once the row is committed.
- ``init_served`` never overwrites: the first gateway of a deployment seeds the row
  from its registry, every later one reads what is there.
- Hold changes of an alias are serialised across processes (PostgreSQL: an advisory lock
  in the transaction; SQLite: a file lock beside the database), and a release runs its
  unload inside that lock: of several gateways letting go of one version at once exactly
  the last one learns that nobody else holds it, and only it unloads it, while a gateway
  taking a hold meanwhile waits and then loads the version again. Neither the state row
  nor SQLite's write lock is held during an unload, so promotions and the log never wait
  for an engine.

Never imports fastapi, torch or vllm.
"""

from __future__ import annotations

import fcntl
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from sqlalchemy import Column, Connection, Float, Integer, MetaData, Table, Text, delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from agentloop.serve.errors import StoreUnavailable

NOTIFY_CHANNEL = "agentloop_served"

_META = MetaData()


def _state_v1(md: MetaData) -> Table:
    return Table(
        "served_state", md,
        Column("alias", Text, primary_key=True),
        Column("live", Text, nullable=False),        # version, e.g. "v0003"
        Column("canary", Text),                      # version taking a share of the alias, or NULL
        Column("canary_share", Float, nullable=False, default=0.0),
        Column("generation", Integer, nullable=False),  # +1 per change: gateways apply each once
        Column("reason", Text),
        Column("updated_by", Text),                  # "host:pid" of the gateway that changed it
        Column("updated_at", Float, nullable=False),
    )


def _holds_v1(md: MetaData) -> Table:
    return Table(
        "served_holds", md,
        Column("alias", Text, primary_key=True),
        Column("gateway", Text, primary_key=True),   # "host:pid"
        Column("name", Text, primary_key=True),      # served name the gateway routes to
        Column("at", Float, nullable=False),         # last heartbeat
    )


STATE = _state_v1(_META)
HOLDS = _holds_v1(_META)


def m005_served(conn: Connection) -> None:
    md = MetaData()
    _state_v1(md), _holds_v1(md)
    md.create_all(conn)


def _row(r: Any) -> dict[str, Any] | None:
    return None if r is None else dict(r._mapping)


class ServedStore:
    """The served-state queries of the ``Store`` (mixin: uses its ``_conn`` and ``dialect``)."""

    _listener = None
    _listener_lock = threading.Lock()

    def get_served(self, alias: str) -> dict[str, Any] | None:
        with self._conn() as conn:
            return _row(conn.execute(select(STATE).where(STATE.c.alias == alias)).first())

    def init_served(self, alias: str, live: str, *, by: str, reason: str = "seeded") -> dict[str, Any]:
        """The alias's state, seeded with `live` (generation 1) if the deployment has none yet."""
        values = dict(alias=alias, live=live, canary=None, canary_share=0.0, generation=1, reason=reason,
                      updated_by=by, updated_at=time.time())
        dialect_insert = sqlite_insert if self._is_sqlite else pg_insert
        with self._conn(write=True) as conn:
            # Two gateways starting at once: the first insert wins, the other's does nothing.
            done = conn.execute(dialect_insert(STATE).values(**values).on_conflict_do_nothing(
                index_elements=["alias"]))
            if done.rowcount:
                self._notify(conn, alias)
        return self.get_served(alias)

    def set_served(self, alias: str, *, live: str, canary: str | None, share: float, by: str,
                   reason: str) -> dict[str, Any]:
        """Change what the alias serves in one transaction; returns the new state (generation + 1)."""
        with self._conn(write=True) as conn:
            row = self._lock_state(conn, alias)
            gen = (row.generation if row is not None else 0) + 1
            values = dict(live=live, canary=canary if share > 0 else None, canary_share=share if canary else 0.0,
                          generation=gen, reason=reason, updated_by=by, updated_at=time.time())
            if row is None:
                conn.execute(insert(STATE).values(alias=alias, **values))
            else:
                conn.execute(update(STATE).where(STATE.c.alias == alias).values(**values))
            self._notify(conn, alias)
            return {"alias": alias, **values}

    def _lock_state(self, conn: Connection, alias: str):
        q = select(STATE).where(STATE.c.alias == alias)
        return conn.execute(q if self._is_sqlite else q.with_for_update()).first()

    def _notify(self, conn: Connection, alias: str) -> None:
        if self.dialect == "postgresql":
            # Sent by this transaction: listeners hear it only once the row is committed.
            conn.execute(text("SELECT pg_notify(:ch, :alias)"), {"ch": NOTIFY_CHANNEL, "alias": alias})

    def wait_served(self, alias: str, after: int, timeout: float, *, poll: float = 0.1) -> dict[str, Any] | None:
        """Block until the alias's state has a generation above `after` (returned), or `timeout`
        seconds pass (None). PostgreSQL wakes on the change's notification (the row is read
        again in any case: a notification is only a wake-up); SQLite reads the row every
        `poll` seconds, a few microseconds on a local file. StoreUnavailable when the
        database cannot be reached (the caller backs off and calls again)."""
        deadline = time.monotonic() + timeout
        pg = self.dialect == "postgresql"
        closing = self._closing_event()
        while not closing.is_set():
            if pg:
                self._listen()  # before reading, so a change between the read and the wait wakes us
            state = self.get_served(alias)
            if state is not None and state["generation"] > after:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pg:
                self._wait_notify(min(left, 0.5))  # short: a closing store is not kept waiting
            else:
                closing.wait(min(left, poll))
        return None

    def _closing_event(self) -> threading.Event:
        with self._listener_lock:
            if getattr(self, "_closing", None) is None:
                self._closing = threading.Event()
            return self._closing

    def _listen(self):
        import psycopg  # only a PostgreSQL deployment needs the driver here

        with self._listener_lock:
            if self._listener is None or self._listener.closed:
                url = make_url(self.url).set(drivername="postgresql")
                try:
                    conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True,
                                           connect_timeout=self._connect_timeout)
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                except psycopg.Error as e:
                    raise StoreUnavailable() from e
                self._listener = conn
            return self._listener

    def _wait_notify(self, timeout: float) -> None:
        import psycopg

        conn = self._listen()
        try:
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as e:
            self._drop_listener()  # the next wait listens on a new connection
            raise StoreUnavailable() from e

    def close_listener(self) -> None:
        """Stop waiting (the store is closing) and close the LISTEN connection."""
        self._closing_event().set()
        self._drop_listener()

    def _drop_listener(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                try:
                    self._listener.close()
                except Exception:
                    pass
                self._listener = None

    # ------------------------------------------------------------ holds

    @contextmanager
    def _holds_lock(self, alias: str) -> Iterator[Connection | None]:
        """Serialise hold changes of `alias` across processes without holding the database's
        write lock (SQLite) or the state row (PostgreSQL) while a release unloads: so a
        promotion, and the request log, never wait for an engine. PostgreSQL: a transaction
        holding an advisory lock (yielded: run the statements on it); SQLite: a file lock beside
        the database (yields None: the statements take their own short transactions)."""
        if not self._is_sqlite:
            with self._conn(write=True) as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"agentloop_holds:{alias}"})
                yield conn
            return
        database = make_url(self.url).database
        if not database or database == ":memory:":
            with self._listener_lock:  # one process: a lock of this process is enough
                yield None
            return
        with open(f"{database}.holds.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield None
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def _on(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self._conn(write=True) as c:
                yield c

    def hold_served(self, alias: str, gateway: str, names: set[str] | frozenset[str]) -> None:
        """Record that `gateway` routes to exactly `names` now (a heartbeat too). Waits for a
        release that is unloading, so a version held from now on is not unloaded under it."""
        now = time.time()
        with self._holds_lock(alias) as locked, self._on(locked) as conn:
            conn.execute(delete(HOLDS).where(HOLDS.c.alias == alias, HOLDS.c.gateway == gateway))
            if names:
                conn.execute(insert(HOLDS), [{"alias": alias, "gateway": gateway, "name": n, "at": now}
                                             for n in sorted(names)])

    def release_hold(self, alias: str, gateway: str, name: str, *, ttl: float,
                     then: Callable[[], None] | None = None) -> bool:
        """`gateway` no longer routes to `name`: drop its hold. When no other gateway (one heard
        from within `ttl` seconds) holds it, run `then` (the unload) before the holds lock is let
        go, and return True. A gateway that starts holding `name` meanwhile waits for the lock,
        so it sees the version unloaded and loads it again; none routes to it while it goes."""
        with self._holds_lock(alias) as locked:
            with self._on(locked) as conn:
                conn.execute(delete(HOLDS).where(HOLDS.c.alias == alias, HOLDS.c.gateway == gateway,
                                                 HOLDS.c.name == name))
                other = conn.execute(select(HOLDS.c.gateway).where(
                    HOLDS.c.alias == alias, HOLDS.c.name == name, HOLDS.c.at > time.time() - ttl).limit(1)).first()
            if other is None and then is not None:
                then()
        return other is None

    def holds(self, alias: str) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(HOLDS).where(HOLDS.c.alias == alias).order_by(HOLDS.c.gateway, HOLDS.c.name))]
