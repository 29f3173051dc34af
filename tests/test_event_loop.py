"""No blocking database call on the event loop (issue 29, item 6).

On a local SQLite file a statement takes microseconds; on a networked PostgreSQL it takes a
round trip, and one run on the event loop stalls every open stream of that gateway while it
waits. So every store call from async code goes through a worker thread. Proved three ways:
- statically: no `async def` under the package calls a store method itself (it hands the
  method to `asyncio.to_thread`), so a new blocking call fails here before it ships;
- the learning loop: an iteration on a store that sleeps 200 ms per statement leaves the
  event loop free (a ticker beside it is never late by more than a fraction of that);
- the gateway: a stream that needs no database call mid-way keeps its pace while feedback is
  posted and listed, runs and stats are read and requests are logged, all on that slow store.
"""

from __future__ import annotations

import ast
import asyncio
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

import agentloop.serve.compose as compose
from agentloop.rl.loop import Iteration, LoopConfig
from agentloop.rl.registry import AdapterRegistry
from agentloop.serve.http.app import create_app
from agentloop.serve.services.loop import GatewayHooks
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from tests.test_gateway_unit import FakeEngine

ROOT = Path(__file__).resolve().parents[1]
DELAY = 0.2      # seconds per statement: a slow network round trip, exaggerated
LATE = 0.1       # a tick or chunk this late means the loop was blocked (one statement is DELAY)
ADMIN = {"Authorization": "Bearer admin-test"}


class SlowStore(Store):
    """The real store with every statement 200 ms slower, counting them."""

    def __init__(self, url: str, **options):
        super().__init__(url, **options)  # migrations at full speed
        self.statements = 0
        event.listen(self.engine, "before_cursor_execute", self._slow)

    def _slow(self, *_args, **_kwargs) -> None:
        self.statements += 1
        time.sleep(DELAY)


def store_calls_in_async_code() -> list[str]:
    """`x.store.m(...)` or `store.m(...)` called directly inside an `async def`."""
    found = []
    for pkg in ("serve", "rl", "agents", "tools", "templates"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                        chain = ast.unparse(node.func.value).split(".")
                        if chain[-1] == "store":
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {fn.name}: "
                                         f"{ast.unparse(node.func)}")
    return found


def test_no_async_function_calls_the_store_itself():
    assert store_calls_in_async_code() == []


class Ticker:
    """Ticks every 10 ms on the event loop and keeps the worst lateness."""

    def __init__(self):
        self.worst = 0.0
        self.ticks = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - t - 0.01)
            self.ticks += 1


class LiveOnly(GatewayHooks):
    """The gateway's hooks with no engines: an iteration that stops at its dataset needs only
    the live version."""

    def __init__(self):
        super().__init__(adapters=None, pool=None)

    def live_version(self) -> str:
        return "v0000"


def test_a_loop_iteration_leaves_the_event_loop_free(tmp_path):
    store = SlowStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    run = store.create_run(method="dpo", trigger="admin")
    it = Iteration(store, AdapterRegistry(tmp_path / "adapters"), base_model="m", template="chatml",
                   hooks=LiveOnly(), config=LoopConfig(), work_dir=tmp_path / "runs")
    ticker = Ticker()

    async def both():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker.run(stop))
        try:
            return await it.run(run)
        finally:
            stop.set()
            await tick

    before = store.statements
    done = asyncio.run(both())
    # The iteration really went through the slow store (status, dataset, failure) ...
    assert done["status"] == "failed" and "not enough" in done["reason"], done
    assert store.statements - before >= 4
    # ... and the loop kept ticking all the while (blocked, it would be DELAY late per statement).
    assert ticker.ticks > 10 and ticker.worst < LATE, f"event loop blocked for {ticker.worst:.3f} s"
    store.close()


class PacedEngine(FakeEngine):
    """Streams a piece every 25 ms until told to finish, and notes when the gateway takes each."""

    def __init__(self):
        super().__init__()
        self.taken: list[float] = []
        self.finish = threading.Event()

    async def chat(self, body):
        if not body.get("stream"):
            async for x in super().chat(body):
                yield x
            return
        base = {"id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        while not self.finish.is_set() and len(self.taken) < 2000:
            self.taken.append(time.perf_counter())
            yield {**base, "choices": [{"index": 0, "delta": {"content": "w "}}]}
            await asyncio.sleep(0.025)
        yield {**base, "choices": [{"index": 0, "delta": {"content": "end"}, "finish_reason": "stop"}]}


def test_a_stream_keeps_its_pace_while_others_use_a_slow_store(tmp_path, monkeypatch):
    monkeypatch.setattr(compose, "Store", SlowStore)
    eng = PacedEngine()
    app = create_app(Settings(home=tmp_path, alias="agentloop", admin_key="admin-test"), engines=[eng])
    app.state.gw.router.add_version("v0000", str(tmp_path / "adapters" / "v0000"), live=True)
    msg = [{"role": "user", "content": "hello"}]
    with TestClient(app) as c:
        store = app.state.gw.store
        done = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": msg})
        assert done.status_code == 200
        streamed: dict = {}

        def stream():
            streamed["r"] = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": msg, "stream": True})

        t = threading.Thread(target=stream)
        t.start()
        while len(eng.taken) < 2:
            time.sleep(0.005)
        before, t0 = store.statements, time.perf_counter()
        # Everything that needs the database, while the stream runs (each call >= one statement).
        fb = c.post("/v1/feedback", json={"completion_id": done.json()["id"], "type": "thumbs", "value": 1})
        assert fb.status_code == 200, fb.text
        assert c.get("/v1/feedback").status_code == 200
        assert c.get("/admin/runs", headers=ADMIN).status_code == 200
        assert c.get("/admin/stats", headers=ADMIN).status_code == 200
        used, t1 = store.statements - before, time.perf_counter()
        eng.finish.set()
        t.join(30)
        assert streamed["r"].status_code == 200 and streamed["r"].text.count('"w "') == len(eng.taken)
    # The other requests spent seconds in the database while the stream was open ...
    assert used >= 4 and t1 - t0 >= 3 * DELAY and eng.taken[0] < t0 and eng.taken[-1] > t1 - 0.1, (used, t1 - t0)
    # ... and no piece of the stream waited for them: every gap stayed near the engine's 25 ms.
    gaps = [b - a for a, b in zip(eng.taken, eng.taken[1:])]
    assert max(gaps) < 0.025 + LATE, f"a stream piece waited {max(gaps):.3f} s"
