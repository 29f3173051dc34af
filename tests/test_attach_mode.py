"""Attach mode: a second gateway in front of an engine that is already running.

This is how users scale out (`agentloop serve --engine-url URL --engine-url URL2`). The second
gateway learns the base model from the engine, loads its base adapter there, routes around an
engine that is down, and on shutdown leaves the engines it did not start running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT, free_port, stop_gateway


def test_gateway_attached_to_running_engines(server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    port = free_port()
    env = {**os.environ, "AGENTLOOP_HOME": str(tmp_path), "AGENTLOOP_HEALTH_INTERVAL": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentloop.serve.cli", "serve", "--port", str(port), "--engine-url", server.engine_url,
         "--engine-url", dead, "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=open(tmp_path / "gw.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        health = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                if health.get("ready"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert health.get("ready"), health
        ready = {e["url"]: e["ready"] for e in health["engines"]}
        assert ready == {server.engine_url: True, dead: False}
        greeting = next(s for s in server.manifest["scripts"] if s["id"] == "greeting")
        for _ in range(3):  # every request goes to the live engine, none to the dead one
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                           json={"model": "agentloop", "messages": greeting["messages"], "temperature": 0,
                                 "max_tokens": 24})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == greeting["expected"]["content"]
    finally:
        code = stop_gateway(proc)
    assert code in (0, -signal.SIGTERM)
    # The engine belongs to the other gateway: still up.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(server.engine_url.rsplit(":", 1)[1]))) == 0
    assert httpx.get(f"{server.engine_url}/health").status_code == 200
