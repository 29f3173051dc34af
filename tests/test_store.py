"""Tests for serve/store/db.py on a real SQLite file (tmp_path) and a real PostgreSQL server.

Every test that takes `url` or `store` runs on both dialects (conftest `db_url`);
the few that are about SQLite itself (pragmas, in-memory) name it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect, text

from agentloop.serve.store import db as store_mod
from agentloop.serve.store.db import MIGRATIONS, Store
from agentloop.serve.store.logwriter import LogWriter

ROOT = Path(__file__).resolve().parents[1]


def row(i: int | str, **kw) -> dict:
    base = {"id": f"cmpl-{i}", "caller": "alice", "model": "agentloop", "stream": False,
            "status_code": 200, "request": {"messages": [{"role": "user", "content": f"hi {i}"}]}}
    base.update(kw)
    return base


@pytest.fixture
def url(db_url: str) -> str:
    return db_url


def index_names(engine, table: str) -> dict[str, bool]:
    """{index name: unique} of one table, on either dialect."""
    return {ix["name"]: bool(ix["unique"]) for ix in inspect(engine).get_indexes(table)}


@pytest.fixture
def store(url: str):
    s = Store(url)
    yield s
    s.close()


def m999_slow_probe(conn) -> None:
    """A migration that widens the race window; creating the table twice would fail."""
    time.sleep(0.2)
    conn.execute(text("CREATE TABLE probe (x INTEGER)"))


# ---------------------------------------------------------------- migrations

def test_migrations_run_once_and_are_recorded(url: str, tmp_path: Path):
    names = [fn.__name__ for fn in MIGRATIONS]
    s = Store.open(url)
    assert s.applied == names
    assert s.schema_version() == names
    s.close()
    s2 = Store(url)  # reopening is a no-op
    assert s2.applied == [] and s2.migrate() == []
    assert s2.schema_version() == names
    with s2.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM _migrations")).scalar() == len(names)
    idx = index_names(s2.engine, "completions")
    assert {"ix_completions_created_at", "ix_completions_caller", "ix_completions_model_version",
            "ix_completions_conversation_hash"} <= idx.keys()
    s2.close()


def test_failed_migration_rolls_back_and_is_not_recorded(url: str, monkeypatch):
    def m002_broken(conn):
        conn.execute(text("CREATE TABLE half_done (x INTEGER)"))
        raise RuntimeError("boom")

    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, m002_broken])
    with pytest.raises(RuntimeError, match="boom"):
        Store(url)
    monkeypatch.setattr(store_mod, "MIGRATIONS", list(MIGRATIONS))
    s = Store(url)
    assert "m002_broken" not in s.schema_version()
    assert not inspect(s.engine).has_table("half_done")  # the DDL was inside the transaction
    s.close()


def test_concurrent_open_threads_apply_each_migration_once(url: str, monkeypatch):
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, m999_slow_probe])
    barrier = threading.Barrier(3)
    results: list = []

    def opener():
        barrier.wait()
        try:
            s = Store(url)
            results.append(s.applied)
            s.close()
        except Exception as e:  # surfaced by the assert below
            results.append(e)

    threads = [threading.Thread(target=opener) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, list) for r in results), results
    applied = [name for r in results for name in r]
    expected = [fn.__name__ for fn in store_mod.MIGRATIONS]
    assert sorted(applied) == sorted(expected)  # each exactly once, across openers


def _open_in_child(url: str, go, out) -> None:
    store_mod.MIGRATIONS.append(m999_slow_probe)
    go.wait(10)
    try:
        s = Store(url)
        out.put(s.applied)
        s.close()
    except Exception as e:
        out.put(repr(e))


def test_concurrent_open_processes_apply_each_migration_once(url: str):
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded pytest
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(url, go, out)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(isinstance(r, list) for r in results), results
    applied = [name for r in results for name in r]
    assert sorted(applied) == sorted([fn.__name__ for fn in MIGRATIONS] + ["m999_slow_probe"])


def test_sqlite_pragmas_and_parent_dir(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'a' / 'b' / 'agentloop.db'}")
    assert (tmp_path / "a" / "b" / "agentloop.db").exists()
    with s.engine.connect() as c:
        pragma = lambda p: c.exec_driver_sql(f"PRAGMA {p}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 1  # NORMAL
        assert pragma("busy_timeout") == 5000
        assert pragma("foreign_keys") == 1
    s.close()


def test_schema_and_insert_compile_for_postgresql():
    from sqlalchemy import MetaData, Table
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    d = postgresql.dialect()
    ddl = str(CreateTable(Table("completions", MetaData(), *store_mod._completions_v1_columns())).compile(dialect=d))
    assert "request TEXT NOT NULL" in ddl and "stream BOOLEAN NOT NULL" in ddl
    ins = store_mod.pg_insert(store_mod.COMPLETIONS).on_conflict_do_nothing(index_elements=["id"])
    assert "ON CONFLICT (id) DO NOTHING" in str(ins.compile(dialect=d))


def test_import_pulls_in_no_heavy_modules():
    code = ("import sys, agentloop.serve.store; bad = [m for m in ('fastapi', 'torch', 'vllm') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ---------------------------------------------------------------- completions

def test_insert_get_round_trip(store: Store):
    req = {"model": "agentloop", "messages": [{"role": "user", "content": "héllo ✓"}],
           "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "n": 1.5}
    resp = {"choices": [{"message": {"content": "hi", "tool_calls": None}}], "usage": {"prompt_tokens": 3}}
    store.insert_completions([row(1, created_at=123.5, request=req, response=resp, stream=True,
                                  served_model="agentloop@v0001", version="v0001", latency_ms=12.5,
                                  prompt_tokens=3, completion_tokens=1, finish_reason="stop",
                                  conversation_hash="abc")])
    got = store.get_completion("cmpl-1")
    assert got["request"] == req and got["response"] == resp
    assert got["stream"] is True and got["created_at"] == 123.5 and got["version"] == "v0001"
    assert got["ttft_ms"] is None and got["error"] is None
    assert store.get_completion("nope") is None
    store.insert_completions([row(2)])  # created_at defaults to now, response stays None
    got = store.get_completion("cmpl-2")
    assert abs(got["created_at"] - time.time()) < 60 and got["response"] is None and got["stream"] is False


def test_list_and_count_with_filters(store: Store):
    rows = [row(i, created_at=1000.0 + i, caller="alice" if i % 2 else "bob",
                model="agentloop" if i < 6 else "other", version=f"v{i % 3}") for i in range(10)]
    store.insert_completions(rows)
    assert [r["id"] for r in store.list_completions(limit=3)] == ["cmpl-9", "cmpl-8", "cmpl-7"]
    assert [r["id"] for r in store.list_completions(limit=3, offset=3)] == ["cmpl-6", "cmpl-5", "cmpl-4"]
    assert store.count_completions() == 10
    assert store.count_completions(caller="alice") == 5
    assert {r["caller"] for r in store.list_completions(caller="bob")} == {"bob"}
    assert store.count_completions(model="other") == 4
    assert [r["id"] for r in store.list_completions(model="agentloop", version="v0")] == ["cmpl-3", "cmpl-0"]
    assert store.count_completions(model="agentloop", version="v0") == 2
    assert store.count_completions(since=1007.0) == 3  # inclusive
    assert store.count_completions(caller="alice", since=1005.0) == 3
    assert store.list_completions(caller="nobody") == []
    assert store.list_completions(limit=1)[0]["request"] == rows[9]["request"]  # decoded
    with pytest.raises(ValueError):
        store.list_completions(limit=-1)


@pytest.mark.parametrize("path", ["on_conflict", "portable"])
def test_duplicate_id_is_ignored(store: Store, path: str):
    if path == "portable":
        store.dialect = "generic"  # exercise the fallback other backends take
    store.insert_completions([row(1, caller="first")])
    store.insert_completions([row(1, caller="retry"), row(2), row(2, caller="dup-in-batch")])
    assert store.count_completions() == 2
    assert store.get_completion("cmpl-1")["caller"] == "first"
    assert store.get_completion("cmpl-2")["caller"] == "alice"


def test_malformed_rows_are_rejected(store: Store, url: str):
    with pytest.raises(ValueError, match="unknown"):
        store.insert_completions([row(1, colour="red")])
    with pytest.raises(ValueError, match="required"):
        store.insert_completions([row(1, request=None)])
    with LogWriter(store) as w:
        with pytest.raises(ValueError):
            w.submit({"id": "x"})
    assert store.count_completions() == 0


def test_in_memory_store_is_shared_with_writer_thread():
    s = Store("sqlite://")
    with LogWriter(s) as w:
        assert all(w.submit(row(i)) for i in range(20))
        assert w.flush()
    assert s.count_completions() == 20
    s.close()


# ---------------------------------------------------------------- LogWriter

def test_writer_many_threads_all_land(store: Store, url: str):
    w = LogWriter(store, batch_size=50, flush_interval=0.05)

    def produce(t: int):
        for i in range(250):
            while not w.submit(row(f"{t}-{i}")):
                time.sleep(0.001)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.flush()
    other = Store(url)  # committed: visible through a separate engine
    assert other.count_completions() == 1000
    other.close()
    assert w.written == 1000 and w.pending == 0 and w.failures == 0
    w.close()


class GatedStore(Store):
    """Writes block until the gate opens, so the queue fills up."""

    def __init__(self, url: str):
        super().__init__(url)
        self.gate = threading.Event()

    def insert_completions(self, rows):
        self.gate.wait(10)
        super().insert_completions(rows)


def test_asubmit_applies_back_pressure_and_loses_nothing(url: str):
    s = GatedStore(url)
    w = LogWriter(s, maxsize=2, batch_size=1, flush_interval=0.01)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        done = asyncio.Event()
        tick_task = asyncio.create_task(ticker())
        producers = asyncio.gather(*(w.asubmit(row(i)) for i in range(30)))
        await asyncio.sleep(0.1)
        assert not w.submit(row("extra"))  # full: the non-blocking path refuses
        # The event loop must keep running while the producers are blocked. Wait for ticks
        # rather than counting them in a fixed window: a loaded machine ticks slowly.
        start, deadline = ticks, asyncio.get_running_loop().time() + 30
        while ticks < start + 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert not producers.done()  # still blocked on the full queue...
        ticks_while_blocked = ticks - start  # ...while the loop ticked
        s.gate.set()
        await producers
        done.set()
        await tick_task
        return ticks_while_blocked

    ticks_while_blocked = asyncio.run(main())
    assert ticks_while_blocked >= 5  # the event loop kept running while the queue was full
    assert w.throttled > 0 and w.rejected == 1
    assert w.flush()
    assert s.count_completions() == 30
    w.close()
    s.close()


def test_close_drains_and_is_idempotent(store: Store):
    w = LogWriter(store, batch_size=1000, flush_interval=30)  # only close can trigger the write
    for i in range(100):
        assert w.submit(row(i))
    t0 = time.monotonic()
    w.close()
    assert time.monotonic() - t0 < 5
    assert store.count_completions() == 100 and w.pending == 0
    w.close()
    assert not w.submit(row("late"))
    with pytest.raises(RuntimeError):
        asyncio.run(w.asubmit(row("late")))
    assert w.flush()  # nothing outstanding


class FlakyStore(Store):
    """Fails the first `fail_times` writes like an unavailable database would."""

    def __init__(self, url: str, fail_times: int):
        super().__init__(url)
        self.fail_times = fail_times
        self.calls = 0

    def insert_completions(self, rows):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
        super().insert_completions(rows)


def test_writer_retries_with_backoff_then_succeeds(url: str):
    s = FlakyStore(url, fail_times=2)
    w = LogWriter(s, max_retries=3, retry_backoff=0.001, flush_interval=5)
    for i in range(10):
        w.submit(row(i))
    assert w.flush()
    assert s.count_completions() == 10 and w.failures == 2 and w.failed_rows == []
    w.close()
    s.close()


def test_writer_dead_letters_then_recovers_on_flush(url: str):
    s = FlakyStore(url, fail_times=4)
    w = LogWriter(s, max_retries=1, retry_backoff=0.001, flush_interval=5)
    for i in range(10):
        w.submit(row(i))
    # The batch fails twice (kept), the flush's retry fails twice: not durable yet.
    assert not w.flush()
    assert len(w.failed_rows) == 10 and w.pending == 10
    assert w.flush()  # the store recovered: the dead letters land
    assert s.count_completions() == 10 and w.failed_rows == [] and w.pending == 0
    assert w.failures == 4 and w.written == 10
    w.close()
    s.close()


def _wait_for_dead_letters(w: LogWriter) -> None:
    deadline = time.monotonic() + 5
    while not w.failed_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.failed_rows


def test_writer_close_retries_dead_letters(url: str):
    s = FlakyStore(url, fail_times=1)
    w = LogWriter(s, max_retries=0, flush_interval=0.01)
    w.submit(row(1))
    _wait_for_dead_letters(w)  # the only attempt failed
    w.close()  # close retries the dead letters once more: now they land
    assert s.count_completions() == 1 and w.failed_rows == [] and w.pending == 0
    s.close()


def test_writer_close_keeps_rows_it_cannot_write(url: str):
    s = FlakyStore(url, fail_times=1000)
    w = LogWriter(s, max_retries=0, flush_interval=0.01)
    w.submit(row(1))
    _wait_for_dead_letters(w)
    w.close()
    assert [r["id"] for r in w.failed_rows] == ["cmpl-1"] and w.pending == 1  # not silently lost
    s.close()


class PoisonStore(Store):
    """A batch containing the id 'cmpl-bad' violates a constraint."""

    def insert_completions(self, rows):
        if any(r["id"] == "cmpl-bad" for r in rows):
            raise sa_exc.IntegrityError("INSERT", {}, Exception("CHECK constraint failed"))
        super().insert_completions(rows)


def test_bad_row_does_not_hold_its_batch_hostage(url: str):
    s = PoisonStore(url)
    w = LogWriter(s, flush_interval=5, retry_backoff=0.001)
    for i in [1, 2, "bad", 3]:
        w.submit(row(i))
    assert not w.flush()  # the bad row is not durable, and flush says so
    assert s.count_completions() == 3
    assert [r["id"] for r in w.failed_rows] == ["cmpl-bad"] and w.pending == 1
    w.close()
    s.close()


def test_flush_returns_promptly(store: Store):
    w = LogWriter(store, flush_interval=30)  # the timer alone would wait 30 s
    assert w.flush(timeout=2)  # idle writer
    w.submit(row(1))
    t0 = time.monotonic()
    assert w.flush(timeout=5) is True
    assert time.monotonic() - t0 < 2
    assert store.get_completion("cmpl-1") is not None
    w.close()


# ---------------------------------------------------------------- feedback (serve/store/feedback.py)

def fb(i: int | str, **kw) -> dict:
    base = {"id": f"fb-{i}", "caller": "alice", "type": "thumbs", "completion_id": "cmpl-1", "value": 1,
            "version": "v1", "created_at": 2000.0 + (i if isinstance(i, int) else 0)}
    base.update(kw)
    return base


def test_feedback_migration_appended_with_its_indexes(store: Store):
    names = [fn.__name__ for fn in MIGRATIONS]
    assert names[:2] == ["m001_completions", "m002_feedback"]  # m001 untouched, m002 after it
    idx = index_names(store.engine, "feedback")
    assert idx["ux_feedback_caller_idempotency_key"] is True
    assert {"ix_feedback_caller_created_at", "ix_feedback_completion_id", "ix_feedback_version",
            "ix_feedback_chosen_id", "ix_feedback_rejected_id"} <= idx.keys()


def test_feedback_schema_compiles_for_postgresql():
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from agentloop.serve.store import feedback as sf

    d = postgresql.dialect()
    ddl = str(CreateTable(sf.FEEDBACK).compile(dialect=d))
    assert "correction TEXT" in ddl and "created_at FLOAT NOT NULL" in ddl
    md = sf.MetaData()
    t = sf.Table("feedback", md, *sf._feedback_v1_columns())
    ux = sf.Index("ux", t.c.caller, t.c.idempotency_key, unique=True)
    assert "CREATE UNIQUE INDEX ux ON feedback (caller, idempotency_key)" in str(CreateIndex(ux).compile(dialect=d))


def test_feedback_round_trip_list_count_and_cursor(store: Store):
    corr = {"role": "assistant", "content": "fixed ✓"}
    got = store.insert_feedback(fb(1, type="correction", value=None, correction=corr))
    assert got["correction"] == corr and store.get_feedback("fb-1") == got
    store.insert_feedback(fb(2, caller="bob", type="rating", value=4, version="v2"))
    store.insert_feedback(fb(3, type="pairwise", completion_id=None, value=None, chosen_id="cmpl-9",
                             rejected_id="cmpl-1", chosen_index=0, rejected_index=1))
    store.insert_feedback(fb(4, created_at=2003.0))  # same created_at as fb-3: id breaks the tie
    assert store.get_feedback("nope") is None
    assert [r["id"] for r in store.list_feedback()] == ["fb-4", "fb-3", "fb-2", "fb-1"]
    assert [r["id"] for r in store.list_feedback(caller="alice", type="thumbs")] == ["fb-4"]
    assert [r["id"] for r in store.list_feedback(completion_id="cmpl-9")] == ["fb-3"]
    assert store.count_feedback(completion_id="cmpl-1") == 4  # direct, and fb-3 as a pairwise side
    assert store.count_feedback(version="v2") == 1 and store.count_feedback(since=2002.0) == 3
    pages, after = [], None
    while True:
        page = store.list_feedback(limit=1, after=after)
        if not page:
            break
        pages.append(page[0]["id"])
        after = page[0]["id"]
    assert pages == ["fb-4", "fb-3", "fb-2", "fb-1"]  # no skip, no repeat across the tie
    with pytest.raises(KeyError):
        store.list_feedback(after="fb-404")
    with pytest.raises(KeyError):
        store.list_feedback(caller="alice", after="fb-2")  # bob's row is no cursor for alice
    with pytest.raises(ValueError):
        store.insert_feedback(fb(5, type="stars"))
    with pytest.raises(ValueError):
        store.insert_feedback(fb(5, colour="red"))


def test_feedback_idempotency_key_is_unique_per_caller(store: Store, monkeypatch):
    first = store.insert_feedback(fb(1, idempotency_key="k", request_hash="h1"))
    again = store.insert_feedback(fb(2, idempotency_key="k", request_hash="h2"))
    assert again == first  # nothing new, the first row back
    assert store.insert_feedback(fb(3, caller="bob", idempotency_key="k"))["id"] == "fb-3"
    store.insert_feedback(fb(4))
    store.insert_feedback(fb(5))  # NULL keys never collide
    assert store.count_feedback() == 4
    # The race the unique index exists for: a concurrent retry inserted between
    # our check and our insert. Simulate by blinding the pre-check once.
    real, calls = store._by_key, []

    def blind_once(conn, caller, key):
        calls.append(key)
        return None if len(calls) == 1 else real(conn, caller, key)

    monkeypatch.setattr(store, "_by_key", blind_once)
    assert store.insert_feedback(fb(6, idempotency_key="k"))["id"] == "fb-1"
    assert len(calls) == 2  # the insert hit the unique index and the row was re-read
    assert store.insert_feedback(fb(4)) == store.get_feedback("fb-4")  # a re-inserted id: harmless
    assert store.count_feedback() == 4


def test_iter_feedback_with_completions_pages_and_joins(store: Store):
    store.insert_completions([row(1, response={"choices": []}), row(9)])
    store.insert_feedback(fb(1))
    store.insert_feedback(fb(2, completion_id="cmpl-gone", created_at=500.0))
    store.insert_feedback(fb(3, type="pairwise", completion_id=None, value=None,
                             chosen_id="cmpl-9", rejected_id="cmpl-1"))
    got = list(store.iter_feedback_with_completions(batch_size=2))
    assert [r["id"] for r in got] == ["fb-2", "fb-1", "fb-3"]  # oldest first, across pages
    assert got[0]["completion"] is None
    assert got[1]["completion"]["request"] == row(1)["request"] and got[1]["completion"]["response"] == {"choices": []}
    assert got[2]["chosen_completion"]["id"] == "cmpl-9" and got[2]["rejected_completion"]["id"] == "cmpl-1"
    assert [r["id"] for r in store.iter_feedback_with_completions(since=2001.0)] == ["fb-1", "fb-3"]
