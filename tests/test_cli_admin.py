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
    return subprocess.run([sys.executable, "-m", "serve.cli", *args, "--url", server.url], cwd=ROOT, env=env,
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
