"""The supervised engine dies: clients get 503 + Retry-After, the gateway restarts it,
reloads the served adapters -- the live one too, not only the base -- and the alias
answers again, from the same version, without an operator.

Named to run last: it takes the shared engine down for a while.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil

from agentloop.rl.registry import AdapterRegistry
from tests.conftest import noisy_adapter


def engine_pid(server) -> int:
    port = int(server.engine_url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"nothing listens on engine port {port}")


def engine_models(server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.engine_url}/v1/models", timeout=30).json()["data"]}


def test_engine_killed_is_restarted_with_the_live_version(server, tmp_path):
    greeting = next(s for s in server.manifest["scripts"] if s["id"] == "greeting")
    body = {"model": "agentloop", "messages": greeting["messages"], "temperature": 0, "max_tokens": 32}

    # A real (noisy) adapter is live, so "reloaded" cannot be satisfied by the base alone.
    reg = AdapterRegistry(server.adapters_root)
    src = noisy_adapter(server.adapters_root / "v0000", tmp_path / "noisy", seed=11)
    m = reg.commit(src, parent="v0000", base_model=reg.get("v0000").base_model, template="chatml-tools",
                   method="test")
    r = server.admin("POST", "/admin/promote", json={"version": m.version})
    assert r.status_code == 200, r.text
    live_name = f"agentloop@{m.version}"
    try:
        before = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
        assert before["model"] == live_name
        live_answer = before["choices"][0]["message"]["content"]
        assert live_answer != greeting["expected"]["content"]  # so the answer tells the versions apart

        # A long stream is running when the engine dies: it ends with an error event, not a hang.
        cut: dict = {}
        started = threading.Event()

        def long_stream():
            long = {**body, "stream": True, "max_tokens": 1500, "ignore_eos": True}
            events = []
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=300) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if not started.is_set():
                            # Killed from here, at the first event: on a fast machine the tiny
                            # model can finish 1500 tokens before another thread gets to it.
                            os.killpg(os.getpgid(old), signal.SIGKILL)
                            started.set()
            cut["events"] = events

        old = engine_pid(server)
        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(120), "the long stream never started"
        t.join(300)
        assert not t.is_alive(), "the cut stream hung"
        assert cut["events"][-1] != "[DONE]"
        err = json.loads(cut["events"][-1])["error"]
        assert err["type"] == "server_error" and err["code"] == "engine_unavailable" and err["message"]
        row = server.wait_row(json.loads(cut["events"][0])["id"], timeout=60)
        assert row["status_code"] == 503 and row["version"] == m.version  # logged as what it was

        saw_503, t_down = 0, time.monotonic()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": saw_503 % 2 == 1},
                           timeout=120)
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "engine_unavailable"
            saw_503 += 1
            time.sleep(1)
        assert saw_503, "the gateway never noticed the engine was gone"
        assert r.status_code == 200, "the engine did not come back"
        print(f"\n[faults] engine SIGKILL: {saw_503} requests answered 503 + Retry-After during "
              f"{time.monotonic() - t_down:.0f} s, then served by {live_name} again")
        after = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
        assert after["model"] == live_name and after["choices"][0]["message"]["content"] == live_answer
        assert engine_pid(server) != old
        assert live_name in engine_models(server)  # reloaded without an operator (the base needs no adapter)
        pinned = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "model": "agentloop@v0000"},
                            timeout=120).json()
        assert pinned["choices"][0]["message"]["content"] == greeting["expected"]["content"]
        health = httpx.get(f"{server.url}/health").json()
        assert health["ready"] and health["live"] == live_name
    finally:
        r = server.admin("POST", "/admin/rollback", json={"version": "v0000"})
    assert r.status_code == 200, r.text
    health = httpx.get(f"{server.url}/health").json()
    assert health["ready"] and health["live"] == "agentloop@v0000"
