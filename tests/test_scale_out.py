"""Two gateways, one live version: real processes on one PostgreSQL database and one engine.

Gateways A and B each have their own home; they share only the database (a real PostgreSQL
server), the registry URL (`AGENTLOOP_REGISTRY_URL`, a file:// folder here: A publishes there,
B fetches its own copy) and the session's vLLM engine, which both attach to (neither
supervises it; given the versions' URLs, it fetches its own copies too). Under traffic through both, a promotion through A reaches
B within the bound, a canary set through A holds on B, a rollback through B reaches A; no
request fails, every logged row names the version its response came from, and the versions
both let go of are unloaded from the shared engine. They serve the alias `scaleout`, so their
versions never share a served name with the session gateway's in that engine.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from agentloop.rl.registry import AdapterRegistry
from tests.conftest import ADMIN_KEY, noisy_adapter, start_gateway, stop_gateway

ALIAS = "scaleout"
BOUND = 2.0  # seconds from a change's commit to the other gateway routing by it (measured: bench/scale_out.py)


def admin(url: str, path: str, **body) -> dict:
    r = httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def served_models(url: str) -> dict:
    return httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]


def wait_for(cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0


class Traffic:
    """Requests through one gateway, one after another, until stopped: what each answered with."""

    def __init__(self, url: str, messages: list[dict]):
        self.url, self.messages = url, messages
        self.results: list[tuple[float, int, str, str]] = []  # (finished at, status, id, model)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as c:
            i = 0
            while not self._stop.is_set():
                stream = i % 2 == 1
                i += 1
                body = {"model": ALIAS, "messages": self.messages, "temperature": 0, "max_tokens": 4,
                        "stream": stream}
                try:
                    if stream:
                        with c.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                            chunks = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
                            first = json.loads(chunks[0][6:]) if chunks else {}
                            models = {json.loads(ch[6:])["model"] for ch in chunks}
                            model = models.pop() if len(models) == 1 else f"mixed:{sorted(models)}"
                            self.results.append((time.monotonic(), r.status_code, first.get("id", ""), model))
                    else:
                        r = c.post(f"{self.url}/v1/chat/completions", json=body)
                        d = r.json()
                        self.results.append((time.monotonic(), r.status_code, d.get("id", ""), d.get("model", "")))
                except httpx.HTTPError as e:
                    self.results.append((time.monotonic(), 0, "", f"{type(e).__name__}: {e}"))

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def models_after(self, t: float) -> set[str]:
        return {m for at, _, _, m in self.results if at > t}


@pytest.mark.postgres
def test_two_gateways_serve_one_live_version(server, pg_url, tmp_path):
    registry = tmp_path / "registry"
    env = {"AGENTLOOP_DATABASE_URL": pg_url, "AGENTLOOP_REGISTRY_URL": f"file://{registry}",
           "AGENTLOOP_ALIAS": ALIAS}
    procs = []
    traffic: list[Traffic] = []
    try:
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir()
            proc, url, _ = start_gateway(home, None, extra=["--engine-url", server.engine_url], env=env,
                                         timeout=180)
            procs.append((proc, url))
        (_, a), (_, b) = procs
        # A's trainer made two versions (in A's own registry, under its home).
        (root,) = {p.parent for p in (tmp_path / "a").glob("adapters/*/v0000")}
        reg = AdapterRegistry(root)
        v1, v2 = (reg.commit(noisy_adapter(root / "v0000", tmp_path / f"noisy-{seed}", seed=seed), parent="v0000",
                             base_model=reg.get("v0000").base_model, template="chatml-tools", method="test").version
                  for seed in (1, 2))
        assert health(a)["served"]["generation"] == health(b)["served"]["generation"] == 1

        messages = next(s for s in server.manifest["scripts"] if s["id"] == "greeting")["messages"]
        traffic = [Traffic(a, messages).start(), Traffic(b, messages).start()]
        time.sleep(1.0)

        # A promotion through A: B routes to it within the bound, and so do the requests through both.
        admin(a, "/admin/promote", version=v1)
        done = time.monotonic()
        lag = wait_for(lambda: health(b)["live"] == f"{ALIAS}@{v1}", BOUND)
        assert health(a)["live"] == f"{ALIAS}@{v1}"
        time.sleep(1.5)
        settled = done + lag + 0.5  # a request that started before the change may still end on the old version
        for t in traffic:
            assert t.models_after(settled) == {f"{ALIAS}@{v1}"}, t.results[-10:]

        # A canary set through A holds on B, share included.
        admin(a, "/admin/canary", version=v2, share=0.5)
        wait_for(lambda: (served_models(b).get("canary") or {}).get("version") == v2, BOUND)
        assert served_models(b)["canary"] == {"version": v2, "share": 0.5}
        start = time.monotonic()
        wait_for(lambda: f"{ALIAS}@{v2}" in traffic[1].models_after(start), 30)  # B's traffic takes its share
        admin(a, "/admin/canary", share=0)
        wait_for(lambda: served_models(b).get("canary") is None, BOUND)

        # B serves its own copies, fetched from the registry URL: nothing assumed a shared disk.
        (b_root,) = {p.parent for p in (tmp_path / "b").glob("adapters/*/v0000")}
        assert {m.version for m in AdapterRegistry(b_root).list()} == {"v0000", v1, v2}
        assert {p.name for p in (registry / root.name).iterdir()} == {v1, v2}
        # And so does the engine (attached, so maybe on another host): it loaded the versions from
        # the registry URL into its own cache (serve/inside_vllm/adapter_fetch.py), not from a home.
        roots = {m["id"]: Path(m["root"]) for m in httpx.get(f"{server.engine_url}/v1/models").json()["data"]}
        assert roots[f"{ALIAS}@{v1}"].name == f"{v1}-{reg.get(v1).weights_sha256[:16]}", roots
        assert tmp_path not in roots[f"{ALIAS}@{v1}"].parents

        # A rollback through B reaches A.
        admin(b, "/admin/rollback", version="v0000")
        wait_for(lambda: health(a)["live"] == f"{ALIAS}@v0000", BOUND)
        time.sleep(1.5)
        for t in traffic:
            t.stop()

        # No request failed and none mixed versions; the log of each names the version that answered it.
        results = [r for t in traffic for r in t.results]
        assert results and all(status == 200 for _, status, _, _ in results), [r for r in results if r[1] != 200][:5]
        assert not [m for *_, m in results if m.startswith("mixed")]
        eng = create_engine(pg_url)
        try:
            deadline = time.monotonic() + 15
            while True:
                with eng.connect() as conn:
                    logged = dict(conn.execute(text("SELECT id, served_model FROM completions")).all())
                if all(i in logged for _, _, i, _ in results) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            eng.dispose()
        assert {i: logged.get(i) for _, _, i, _ in results} == {i: m for _, _, i, m in results}
        assert {m for *_, m in results} >= {f"{ALIAS}@v0000", f"{ALIAS}@{v1}", f"{ALIAS}@{v2}"}

        # Both let go of v1 and v2: whichever was last unloaded them from the shared engine.
        def engine_has() -> set[str]:
            return {m["id"] for m in httpx.get(f"{server.engine_url}/v1/models").json()["data"]}
        wait_for(lambda: not ({f"{ALIAS}@{v1}", f"{ALIAS}@{v2}"} & engine_has()), 30)
    finally:
        for t in traffic:
            t.stop()
        for proc, _ in procs:
            stop_gateway(proc)
