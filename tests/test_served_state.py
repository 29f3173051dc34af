"""One live version on every gateway: the served state in the store, watched by each gateway.

Store level, on SQLite and on a real PostgreSQL server: the alias's row is seeded once, every
change is one transaction with a new generation, a waiter on another connection wakes on it
(PostgreSQL: LISTEN/NOTIFY, SQLite: a poll), and holds let only the last gateway that lets go
of a version unload it. Gateway level: two adapter managers with store-backed routers (each its
own Store, as two processes have) on one database and one registry, in front of one shared
engine: a promotion, a rollback and a canary made through either reach the other, and a version
still routed to by one gateway is never unloaded by the other. The same with real processes and
the real engine is tests/test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from agentloop.rl.registry import AdapterRegistry
from agentloop.serve.engine.adapters import AdapterManager
from agentloop.serve.engine.client import Engine, EnginePool
from agentloop.serve.engine.router import StoreServedVersions
from agentloop.serve.store.db import Store
from agentloop.rl.zero_adapter import write_zero_adapter
from tests.test_engine_reverify import registry_with_versions as reverify_registry


# ---------------------------------------------------------------- store level

def test_served_state_is_seeded_once_and_each_change_is_a_generation(db_url):
    a, b = Store(db_url), Store(db_url)
    try:
        assert a.get_served("agentloop") is None
        first = a.init_served("agentloop", "v0000", by="a")
        assert (first["live"], first["generation"]) == ("v0000", 1)
        # A second gateway's seed never overwrites what is there.
        assert b.init_served("agentloop", "v0007", by="b")["live"] == "v0000"
        s = b.set_served("agentloop", live="v0001", canary="v0002", share=0.25, by="b", reason="promoted")
        assert (s["live"], s["canary"], s["canary_share"], s["generation"]) == ("v0001", "v0002", 0.25, 2)
        got = a.get_served("agentloop")
        assert (got["live"], got["canary"], got["generation"], got["updated_by"]) == ("v0001", "v0002", 2, "b")
        # A canary with no share is no canary; other aliases are their own rows.
        s = a.set_served("agentloop", live="v0001", canary="v0002", share=0.0, by="a", reason="canary ended")
        assert (s["canary"], s["canary_share"], s["generation"]) == (None, 0.0, 3)
        assert a.get_served("other") is None
    finally:
        a.close(), b.close()


def test_a_waiter_wakes_on_a_change_made_elsewhere(db_url):
    a, b = Store(db_url), Store(db_url)
    try:
        a.init_served("agentloop", "v0000", by="a")
        t0 = time.monotonic()
        assert b.wait_served("agentloop", 1, 0.3) is None  # nothing newer: times out
        assert time.monotonic() - t0 >= 0.3
        seen: dict = {}

        def waiter():
            seen["state"] = b.wait_served("agentloop", 1, 10.0)
            seen["at"] = time.monotonic()

        th = threading.Thread(target=waiter)
        th.start()
        time.sleep(0.5)  # the waiter is waiting (PostgreSQL: listening)
        changed = time.monotonic()
        a.set_served("agentloop", live="v0001", canary=None, share=0.0, by="a", reason="promoted")
        th.join(10)
        assert seen["state"]["live"] == "v0001" and seen["state"]["generation"] == 2
        assert seen["at"] - changed < 1.0, seen["at"] - changed
        # Already newer than what the caller has: returned at once.
        assert b.wait_served("agentloop", 0, 5.0)["generation"] == 2
    finally:
        a.close(), b.close()


def test_only_the_last_gateway_to_let_go_of_a_version_unloads_it(db_url):
    s = Store(db_url)
    try:
        s.init_served("agentloop", "v0001", by="a")
        s.hold_served("agentloop", "A", {"agentloop@v0001"})
        s.hold_served("agentloop", "B", {"agentloop@v0001", "agentloop@v0002"})
        unloaded = []
        # A lets go first: B still routes to it, so A must not unload it.
        assert s.release_hold("agentloop", "A", "agentloop@v0001", ttl=30, then=lambda: unloaded.append("A")) is False
        assert unloaded == []
        assert s.release_hold("agentloop", "B", "agentloop@v0001", ttl=30, then=lambda: unloaded.append("B"))
        assert unloaded == ["B"]
        assert {(h["gateway"], h["name"]) for h in s.holds("agentloop")} == {("B", "agentloop@v0002")}
        # A hold is a heartbeat: one not renewed within the ttl (its gateway died) keeps nothing loaded.
        s.hold_served("agentloop", "A", {"agentloop@v0002"})
        time.sleep(0.3)
        assert s.release_hold("agentloop", "A", "agentloop@v0002", ttl=30) is False  # B's is fresh
        assert s.release_hold("agentloop", "C", "agentloop@v0002", ttl=0.2) is True  # B's is stale by then
        # hold_served replaces a gateway's set.
        s.hold_served("agentloop", "B", set())
        assert s.holds("agentloop") == []
    finally:
        s.close()


def test_an_unload_in_progress_holds_back_new_holds_but_not_a_promotion(db_url):
    s, other = Store(db_url), Store(db_url)  # two gateways' stores
    try:
        s.init_served("agentloop", "v0001", by="a")
        s.hold_served("agentloop", "A", {"agentloop@v0001"})
        unloading, done = threading.Event(), {}

        def unload():  # the engine takes its time
            unloading.set()
            time.sleep(1.0)
            done["unloaded"] = time.monotonic()

        th = threading.Thread(target=lambda: s.release_hold("agentloop", "A", "agentloop@v0001", ttl=30, then=unload))
        th.start()
        assert unloading.wait(10)
        t0 = time.monotonic()
        other.set_served("agentloop", live="v0002", canary=None, share=0.0, by="b", reason="promoted")
        assert time.monotonic() - t0 < 0.5  # a promotion does not wait for the engine
        other.hold_served("agentloop", "B", {"agentloop@v0001"})  # waits for the unload to finish
        assert time.monotonic() >= done["unloaded"]
        th.join(10)
        assert {(h["gateway"], h["name"]) for h in s.holds("agentloop")} == {("B", "agentloop@v0001")}
    finally:
        s.close(), other.close()


def test_a_heartbeat_never_writes_back_a_version_let_go_of_meanwhile(db_url):
    """A gateway's heartbeat reads its served set, then writes it in a thread; if the version it
    read is retired and released in between, the late write would hold it again, so neither
    gateway would ever unload it. Holds and releases of one gateway take turns."""
    store = Store(db_url)
    try:
        r = StoreServedVersions("agentloop", store)
        store.init_served("agentloop", "v0001", by="a")
        r.add_version("v0000", "/adapters/v0000", live=True)
        r.add_version("v0001", "/adapters/v0001")
        real = store.hold_served

        def slow_hold(*a, **k):  # the database is slow to take the heartbeat
            time.sleep(0.3)
            real(*a, **k)

        store.hold_served = slow_hold
        unloaded = []

        async def unload():
            unloaded.append("agentloop@v0001")

        async def main():
            beat = asyncio.create_task(r.hold())
            await asyncio.sleep(0.05)  # the heartbeat is under way with v0001 in its set
            r.remove("agentloop@v0001")
            assert await r.unload_unheld("agentloop@v0001", unload)
            await beat

        asyncio.run(main())
        assert unloaded == ["agentloop@v0001"] and store.holds("agentloop") == []
    finally:
        store.close()


# ---------------------------------------------------------------- two gateways, one engine

class SharedEngine(Engine):
    """One vLLM server that two gateways both reach: records what is loaded in it."""

    url = "fake://shared"

    def __init__(self):
        self.loaded: set[str] = set()
        self.log: list[tuple[str, str]] = []

    @property
    def ready(self) -> bool:
        return True

    async def chat(self, body):  # pragma: no cover - no request goes through here
        raise NotImplementedError
        yield

    async def load_adapter(self, name: str, path: str) -> None:
        self.loaded.add(name)
        self.log.append(("load", name))
        assert Path(path).is_dir(), path

    async def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)
        self.log.append(("unload", name))


def registry_with_versions(tmp_path: Path, n: int = 2) -> tuple[Path, Path, list[str]]:
    """Gateway A's registry (`registry/`): the base and `n` trained versions; (root, base, versions)."""
    base, reg, versions = reverify_registry(tmp_path, root="registry", n=n)
    return reg.root, base, [m.version for m in versions]


async def until(cond, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("not within the bound")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def manager(db_url: str, root: Path, base: Path, engine: Engine, url: str | None) -> AdapterManager:
    """One gateway's adapter manager: its own Store and local registry `root` (v0000 written, as
    Boot does), the deployment's registry at `url`."""
    write_zero_adapter(base, root / "v0000")
    router = StoreServedVersions("agentloop", Store(db_url), poll=0.05, heartbeat=0.5)
    return AdapterManager(router, EnginePool([engine]), max_rank=64, registry_url=url)


async def started(m: AdapterManager, root: Path, base: Path) -> AdapterManager:
    await m.start()
    m.bind(root, base_model=str(base))
    return m


async def closed(*managers: AdapterManager) -> None:
    for m in managers:
        await m.aclose()
        m.router.store.close()


def test_two_gateways_follow_one_served_state(db_url, tmp_path):
    root, base, (v1, v2) = registry_with_versions(tmp_path)  # gateway A's registry: it trained both
    b_root = tmp_path / "b" / root.name                      # gateway B's: only the base, on its own disk
    url = (tmp_path / "deployment").as_uri()                 # the registry URL both reach
    engine = SharedEngine()

    async def main():
        a = await started(manager(db_url, root, base, engine, url), root, base)
        b = await started(manager(db_url, b_root, base, engine, url), b_root, base)
        ra, rb = a.router, b.router
        try:
            await until(lambda: a.state_applied and b.state_applied)
            assert ra.live == rb.live == "agentloop@v0000" and ra.generation == rb.generation == 1

            # A promotion through A publishes v1 at the URL and reaches B within the bound; B fetched
            # its own copy (hashes checked) and loads that.
            r = await a.promote(v1)
            assert r["generation"] == 2
            lag = await until(lambda: rb.live == f"agentloop@{v1}", 2.0)
            assert lag < 1.0 and rb.generation == 2
            assert f"agentloop@{v1}" in engine.loaded
            assert AdapterRegistry(b_root).verify(v1).weights_sha256 == AdapterRegistry(root).get(v1).weights_sha256
            assert rb.versions[f"agentloop@{v1}"].path == str(b_root / v1)

            # A canary set through A holds on B, with its share.
            await a.set_canary(v2, 0.3)
            await until(lambda: rb.canary == (f"agentloop@{v2}", 0.3), 2.0)

            # B has a request in flight on v1 when A promotes v2: A drains at once and lets go
            # of v1, but must not unload it while B still routes that request to it.
            held = rb.resolve(f"agentloop@{v1}")
            rb.acquire(held)
            await a.promote(v2)
            await until(lambda: rb.live == f"agentloop@{v2}" and rb.canary is None, 2.0)
            await asyncio.sleep(0.3)  # A's retirement of v1 has run
            assert f"agentloop@{v1}" in engine.loaded, engine.log
            rb.release(held)  # B's request ends: B is the last to let go, and unloads it
            await until(lambda: f"agentloop@{v1}" not in engine.loaded, 2.0)
            assert engine.log.count(("unload", f"agentloop@{v1}")) == 1

            # A rollback through B converges on A the same way.
            await b.rollback(v1)
            await until(lambda: ra.live == f"agentloop@{v1}", 2.0)
            assert f"agentloop@{v1}" in engine.loaded and ra.generation == rb.generation
            # The promoting gateway writes its own registry's manifests: B's says v1 is live.
            assert AdapterRegistry(b_root).live().version == v1
        finally:
            await closed(a, b)

    asyncio.run(main())


def test_a_version_altered_at_the_url_is_not_served(db_url, tmp_path):
    root, base, (v1, _) = registry_with_versions(tmp_path)
    b_root = tmp_path / "b" / root.name
    url = (tmp_path / "deployment").as_uri()
    engine = SharedEngine()

    async def main():
        a = await started(manager(db_url, root, base, engine, url), root, base)
        b = await started(manager(db_url, b_root, base, engine, url), b_root, base)
        try:
            await until(lambda: a.state_applied and b.state_applied)
            a.mirror.publish(v1)
            weights = tmp_path / "deployment" / root.name / v1 / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
            await a.promote(v1)  # A has its own intact copy
            await until(lambda: b.follow_error is not None, 3.0)
            assert "sha256" in b.follow_error and b.router.live == "agentloop@v0000"  # B keeps the last good state
            assert not (b_root / v1).exists() and not list(b_root.glob(".tmp-*"))
            assert b.served_health()["generation"] == 1 and a.served_health()["generation"] == 2
        finally:
            await closed(a, b)

    asyncio.run(main())


def test_a_gateway_that_starts_later_serves_the_deployments_state(db_url, tmp_path):
    root, base, (v1, _) = registry_with_versions(tmp_path)
    engine = SharedEngine()

    async def main():
        a = await started(manager(db_url, root, base, engine, None), root, base)
        try:
            await until(lambda: a.state_applied)
            await a.promote(v1)
            # The registry said so too, but the store is the truth: make the registry disagree.
            AdapterRegistry(root).set_status(v1, "rejected", "test: the registry is not what is served")
            b = await started(manager(db_url, root, base, engine, None), root, base)
            assert not b.state_applied  # not ready before the deployment's state is applied
            await until(lambda: b.state_applied)
            assert b.router.live == f"agentloop@{v1}" and b.served_health()["generation"] == 2
            await closed(b)
        finally:
            await closed(a)

    asyncio.run(main())
