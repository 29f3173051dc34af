"""The supervised engine dies: clients get 503 + Retry-After, the gateway restarts it,
reloads the served adapters, and the alias answers again without an operator.

Named to run last: it takes the shared engine down for a while.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil


def engine_pid(server) -> int:
    port = int(server.engine_url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"nothing listens on engine port {port}")


def test_engine_killed_is_restarted(server):
    greeting = next(s for s in server.manifest["scripts"] if s["id"] == "greeting")
    body = {"model": "agentloop", "messages": greeting["messages"], "temperature": 0, "max_tokens": 32}
    old = engine_pid(server)
    os.killpg(os.getpgid(old), signal.SIGKILL)

    saw_503 = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"]
        saw_503 = True
        time.sleep(1)
    assert saw_503, "the gateway never noticed the engine was gone"
    assert r.status_code == 200, "the engine did not come back"
    assert r.json()["choices"][0]["message"]["content"] == greeting["expected"]["content"]
    assert engine_pid(server) != old
    health = httpx.get(f"{server.url}/health").json()
    assert health["ready"] and health["live"] == "agentloop@v0000"
