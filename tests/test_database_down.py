"""The database going away and coming back (issue 29, item 5).

Owns:
- the request log's writer through an outage: rows it cannot write are kept (bounded: the
  oldest beyond `max_failed` are dropped and counted) and written by themselves when the
  store is back, with no flush or restart;
- a training run that meets an outage ends `failed` in the store once it is back, so it does
  not stay active and refuse every later run;
- a gateway on a real PostgreSQL server that is stopped and started again: requests that
  need the database get a 503 with Retry-After at once (well inside the connect timeout),
  chat completions, streamed and not, go on, /metrics shows the rows waiting, and when the
  server is back the gateway reconnects by itself: feedback works again and the completions
  logged during the outage are in the database.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from agentloop.serve.errors import StoreUnavailable
from agentloop.serve.http.app import create_app
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from agentloop.serve.store.logwriter import LogWriter
from tests.test_gateway_unit import FakeEngine

MSG = [{"role": "user", "content": "hello"}]
ADMIN = {"Authorization": "Bearer admin-test"}


def row(i: int) -> dict:
    return {"id": f"cmpl-{i}", "caller": "alice", "model": "agentloop", "stream": False, "status_code": 200,
            "request": {"messages": MSG}}


class DownStore(Store):
    """The real store, unreachable while `down` is set (as the real one reports it)."""

    down = False

    def insert_completions(self, rows):
        if self.down:
            raise StoreUnavailable()
        super().insert_completions(rows)


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_the_writer_keeps_rows_through_an_outage_and_writes_them_after_by_itself(db_url: str):
    s = DownStore(db_url)
    s.down = True
    w = LogWriter(s, max_retries=0, flush_interval=0.01, retry_interval=0.05, max_retry_interval=0.2)
    for i in range(6):
        assert w.submit(row(i))
    assert wait_until(lambda: w.dead_letters == 6)
    time.sleep(0.5)  # several idle retries fail meanwhile: nothing lost, nothing doubled
    assert w.dead_letters == 6 and w.pending == 6 and w.dropped == 0
    s.down = False  # no flush, no new row: the idle retry finds the store back
    assert wait_until(lambda: w.pending == 0, timeout=5)
    assert s.count_completions() == 6 and w.dead_letters == 0
    w.close()
    s.close()


def test_the_dead_letters_are_bounded_and_what_is_dropped_is_counted(db_url: str):
    s = DownStore(db_url)
    s.down = True
    w = LogWriter(s, max_retries=0, flush_interval=0.01, max_failed=5, retry_interval=60)
    for i in range(8):
        assert w.submit(row(i))
    assert wait_until(lambda: w.dead_letters == 5 and w.dropped == 3)
    assert w.pending == 5 and [r["id"] for r in w.failed_rows] == [f"cmpl-{i}" for i in range(3, 8)]  # the newest
    s.down = False
    assert w.flush()
    assert s.count_completions() == 5 and w.pending == 0
    w.close()
    s.close()


class DownRuns(Store):
    """The real store whose run updates fail while `down` is set."""

    down = False

    def update_run(self, run_id, **fields):
        if self.down:
            raise StoreUnavailable()
        return super().update_run(run_id, **fields)


def test_a_run_that_meets_an_outage_ends_failed_once_the_store_is_back(tmp_path):
    import asyncio

    from agentloop.rl.loop import Iteration, LoopConfig
    from agentloop.rl.registry import AdapterRegistry
    from tests.test_event_loop import LiveOnly

    store = DownRuns(f"sqlite:///{tmp_path / 'db.sqlite'}")
    run = store.create_run(method="dpo", trigger="admin")
    it = Iteration(store, AdapterRegistry(tmp_path / "adapters"), base_model="m", template="chatml",
                   hooks=LiveOnly(), config=LoopConfig(), work_dir=tmp_path / "runs")
    it.final_retry_seconds = 0.05
    store.down = True

    async def outage_then_back():
        task = asyncio.create_task(it.run(run))
        await asyncio.sleep(0.4)  # several tries fail meanwhile
        assert not task.done()
        store.down = False
        return await asyncio.wait_for(task, 10)

    done = asyncio.run(outage_then_back())
    assert done["status"] == "failed" and "StoreUnavailable" in done["reason"]
    assert store.active_run() is None
    assert store.create_run(method="dpo", trigger="admin")["status"] == "queued"  # the next run may start
    store.close()


def metric(c: TestClient, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.postgres
def test_a_gateway_through_a_postgresql_outage(tmp_path):
    from tests.pgcluster import start_cluster

    cluster = start_cluster()  # its own server: this test stops it
    try:
        settings = Settings(home=tmp_path, alias="agentloop", admin_key="admin-test",
                            database_url=cluster.new_database(), db_connect_timeout=3)
        app = create_app(settings, engines=[FakeEngine()])
        app.state.gw.router.add_version("v0000", str(tmp_path / "adapters" / "v0000"), live=True)
        with TestClient(app) as c:
            first = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG}).json()["id"]
            fb = {"completion_id": first, "type": "thumbs", "value": 1}
            assert c.post("/v1/feedback", json=fb).status_code == 200

            cluster.stop()
            for method, path, kw in (("POST", "/v1/feedback", {"json": fb}), ("GET", "/v1/feedback", {}),
                                     ("GET", "/admin/runs", {"headers": ADMIN})):
                t = time.perf_counter()
                r = c.request(method, path, **kw)
                took = time.perf_counter() - t
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["retry-after"] and r.json()["error"]["code"] == "database_unavailable"
                assert "postgres" not in r.text.lower()  # the driver's words stay in the log
                assert took < settings.db_connect_timeout + 1, (path, took)
            # Chat needs no database on its way: it goes on, and its log rows wait.
            during = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG})
            assert during.status_code == 200
            streamed = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG, "stream": True})
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
            assert wait_until(lambda: metric(c, "agentloop_log_dead_letters") >= 2, timeout=15)

            cluster.start()  # same port, same data
            again = {"completion_id": first, "type": "rating", "value": 5}
            assert wait_until(lambda: c.post("/v1/feedback", json=again).status_code == 200, timeout=15)
            assert wait_until(lambda: metric(c, "agentloop_log_pending") == 0, timeout=40)
            assert metric(c, "agentloop_log_dropped_rows") == 0 and metric(c, "agentloop_log_dead_letters") == 0
            store = app.state.gw.store
            assert store.get_completion(during.json()["id"]) is not None
            assert store.count_completions() == 3 and store.count_feedback() == 2
    finally:
        cluster.destroy()
