"""The admin CLI against the real gateway, as an operator would type it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ADMIN_KEY, ROOT


def cli(server, *args, key: str | None = ADMIN_KEY):
    env = {k: v for k, v in os.environ.items() if k != "AGENTLOOP_ADMIN_KEY"}
    env["AGENTLOOP_HOME"] = str(server.home)
    if key:
        env["AGENTLOOP_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "agentloop.serve.cli", *args, "--url", server.url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_admin_cli(server):
    r = cli(server, "adapters")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("v0000")
    r = cli(server, "runs")
    assert r.returncode == 0, r.stderr
    r = cli(server, "promote", "v0999")
    assert r.returncode == 1 and "404" in r.stderr and "v0999" in r.stderr
    r = cli(server, "adapters", key="wrong")
    assert r.returncode == 1 and "401" in r.stderr
    r = cli(server, "canary", "--off")
    assert r.returncode == 0 and '"share": 0.0' in r.stdout
    # The separate scheduler worker reads the same store; one check, nothing due.
    r = cli(server, "loop", "--once", "--database-url", f"sqlite:///{server.home / 'agentloop.db'}")
    assert r.returncode == 0, r.stderr
    assert "watching" in r.stderr


def test_loop_worker_starts_a_run_when_feedback_is_due(tmp_path):
    """`agentloop loop` reads the store and asks the gateway to train; here the gateway is a
    small local HTTP server that records the call (training itself is test_learning_loop's)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from agentloop.serve.store.db import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for i in range(3):
        store.insert_completions([{"id": f"c{i}", "caller": "k", "model": "agentloop", "stream": False,
                                   "status_code": 200, "request": {"messages": []}}])
        store.insert_feedback({"id": f"fb{i}", "caller": "k", "type": "thumbs", "completion_id": f"c{i}", "value": 1})
    store.close()
    calls = []

    class Fake(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            calls.append((self.path, self.headers["authorization"], json.loads(body)))
            out = json.dumps({"id": "run-x", "status": "queued"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {**os.environ, "AGENTLOOP_ADMIN_KEY": ADMIN_KEY, "AGENTLOOP_HOME": str(tmp_path)}
    base = [sys.executable, "-m", "agentloop.serve.cli", "loop", "--once", "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--url", f"http://127.0.0.1:{httpd.server_port}"]
    try:
        r = subprocess.run(base, cwd=ROOT, env={**env, "AGENTLOOP_LOOP_MIN_NEW_FEEDBACK": "5"},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert calls == []  # 3 new feedback < 5: nothing due
        r = subprocess.run(base, cwd=ROOT, env={**env, "AGENTLOOP_LOOP_MIN_NEW_FEEDBACK": "3"},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert calls == [("/admin/train", f"Bearer {ADMIN_KEY}", {"promote": True})]
        assert "started run-x" in r.stderr
    finally:
        httpd.shutdown()
