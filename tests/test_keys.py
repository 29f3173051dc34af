"""User API keys, open mode and the admin boundary (serve/services/access.py, serve/store/keys.py, serve/cli/keys.py).

In-process: the real app with a fake engine (tests/test_gateway_unit.py) and a
real SQLite store in tmp_path, keys created through the store or the CLI —
never in the session `server` fixture's store, whose open mode other tests use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agentloop.serve.cli import main as cli
from agentloop.serve.services.access import StartupRefused
from agentloop.serve.http.app import create_app
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from tests.conftest import ROOT
from tests.test_gateway_unit import FakeEngine

MSG = [{"role": "user", "content": "hello"}]
ADMIN = "admin-key-for-tests-0123456789"
CHAT = {"model": "agentloop", "messages": MSG}


def db_url(home: Path) -> str:
    return f"sqlite:///{home / 'agentloop.db'}"


def add_key(home: Path, name: str = "alice", **kw) -> tuple[dict, str]:
    with Store(db_url(home)) as s:
        return s.create_key(name=name, **kw)


def make_app(home: Path, engine: FakeEngine | None = None, **overrides):
    settings = Settings(home=home, alias="agentloop", keys_refresh_seconds=0.1, **overrides)
    app = create_app(settings, engines=[engine or FakeEngine()])
    app.state.gw.router.add_version("v0000", str(home / "adapters" / "v0000"), live=True)
    return app


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_error(r, status: int, code: str | None, etype: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == etype and err["code"] == code
    return err


def wait_for(fn, timeout: float = 5.0) -> float:
    """Seconds until fn() is true (polling); fails after `timeout`."""
    t0 = time.monotonic()
    while not fn():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_open_mode_on_loopback_takes_any_bearer_or_none(tmp_path):
    with TestClient(make_app(tmp_path)) as c:
        assert c.app.state.gw.access.mode == "open"
        for headers in ({}, bearer("anything"), bearer("x")):
            assert c.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        assert c.get("/v1/models").status_code == 200


def test_with_a_key_every_v1_request_needs_one(tmp_path):
    key, raw = add_key(tmp_path)
    with TestClient(make_app(tmp_path)) as c:
        assert c.app.state.gw.access.mode == "keys"
        for headers in ({}, bearer("not-a-key"), {"Authorization": raw}):  # no "Bearer": not a key either
            assert_error(c.post("/v1/chat/completions", json=CHAT, headers=headers), 401, "invalid_api_key")
            assert_error(c.get("/v1/models", headers=headers), 401, "invalid_api_key")
            assert_error(c.get("/v1/feedback", headers=headers), 401, "invalid_api_key")
            assert_error(c.post("/v1/feedback", json={}, headers=headers), 401, "invalid_api_key")
        assert "didn't provide an API key" in c.get("/v1/models").json()["error"]["message"]
        # What stays reachable as before: health, metrics, the pages and their files.
        for path in ("/health", "/metrics", "/", "/ui/static/chat.js"):
            assert c.get(path).status_code == 200, path
        r = c.post("/v1/chat/completions", json=CHAT, headers=bearer(raw))
        assert r.status_code == 200
        # A managed key's caller id is what serve/http/auth.py derives from any bearer: its
        # completions and feedback stay its own, and a key imported for an existing
        # bearer keeps that bearer's history.
        assert key["caller"] == "key-" + hashlib.sha256(raw.encode()).hexdigest()[:16]
        fb = c.post("/v1/feedback", json={"completion_id": r.json()["id"], "type": "thumbs", "value": 1},
                    headers=bearer(raw))
        assert fb.status_code == 200, fb.text
        assert [f["id"] for f in c.get("/v1/feedback", headers=bearer(raw)).json()["data"]] == [fb.json()["id"]]
        c.app.state.gw.writer.flush()
    with Store(db_url(tmp_path)) as s:
        assert {row["caller"] for row in s.list_completions()} == {key["caller"]}


def test_new_and_revoked_keys_take_effect_within_the_refresh(tmp_path, monkeypatch, capsys):
    """The CLI writes the store; the running gateway notices within keys_refresh_seconds."""
    monkeypatch.setenv("AGENTLOOP_HOME", str(tmp_path))
    first, raw_first = add_key(tmp_path, "first")
    with TestClient(make_app(tmp_path)) as c:
        ok = lambda raw: c.get("/v1/models", headers=bearer(raw)).status_code == 200  # noqa: E731
        assert ok(raw_first)
        assert cli.main(["keys", "create", "--name", "second"]) == 0
        raw_second = capsys.readouterr().out.strip()
        assert raw_second.startswith("al-") and not ok("al-" + "x" * 43)
        t_new = wait_for(lambda: ok(raw_second))
        assert cli.main(["keys", "revoke", first["id"]]) == 0
        t_revoked = wait_for(lambda: not ok(raw_first))
        err = assert_error(c.get("/v1/models", headers=bearer(raw_first)), 401, "invalid_api_key")
        assert "revoked" in err["message"]
        assert ok(raw_second)
    print(f"\n[keys] new key accepted after {t_new:.2f} s, revoked key refused after {t_revoked:.2f} s "
          "(refresh every 0.1 s here, 1 s by default)")
    assert t_new < 2 and t_revoked < 2


def test_a_public_address_needs_keys_or_explicit_open_mode(tmp_path, caplog):
    with pytest.raises(StartupRefused, match="agentloop keys create"):
        with TestClient(make_app(tmp_path, host="0.0.0.0")):
            pass
    caplog.set_level(logging.WARNING, logger="agentloop.access")
    with TestClient(make_app(tmp_path, host="0.0.0.0", open=True)) as c:
        assert c.app.state.gw.access.mode == "open"
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert any("OPEN MODE on 0.0.0.0" in r.getMessage() for r in caplog.records)
    key, raw = add_key(tmp_path)
    with TestClient(make_app(tmp_path, host="0.0.0.0")) as c:
        assert c.get("/v1/models", headers=bearer(raw)).status_code == 200
        with Store(db_url(tmp_path)) as s:
            s.revoke_key(key["id"])
        # The last key revoked: a public gateway does not fall open, it refuses everyone.
        wait_for(lambda: c.get("/v1/models", headers=bearer(raw)).status_code == 401)
        err = assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert "No API key is active" in err["message"]


def test_admin_endpoints_refuse_user_keys(tmp_path):
    _, raw = add_key(tmp_path)
    with TestClient(make_app(tmp_path, admin_key=ADMIN)) as c:
        assert c.get("/admin/runs", headers=bearer(ADMIN)).status_code == 200
        assert c.get("/admin/models", headers=bearer(ADMIN)).json()["data"][0]["id"] == "agentloop"
        err = assert_error(c.get("/admin/runs", headers=bearer(raw)), 403, "permission_denied")
        assert "User API keys cannot use admin endpoints" in err["message"]
        assert_error(c.post("/admin/train", json={}, headers=bearer(raw)), 403, "permission_denied")
        assert c.post("/admin/login", json={"key": raw}).status_code == 401
        # The admin key is not a user key: /v1 refuses it while keys are in use.
        assert_error(c.get("/v1/models", headers=bearer(ADMIN)), 401, "invalid_api_key")
        # A user key equal to the admin key (the CLI refuses to make one; the store is
        # written here directly) is known to a user: admin endpoints refuse it too.
        with Store(db_url(tmp_path)) as s:
            clash, _ = s.create_key(name="clash", raw_key=ADMIN)
        wait_for(lambda: c.get("/admin/runs", headers=bearer(ADMIN)).status_code == 403)
        err = assert_error(c.get("/admin/runs", headers=bearer(ADMIN)), 403, "permission_denied")
        assert clash["id"] in err["message"] and "AGENTLOOP_ADMIN_KEY" in err["message"]
        assert c.post("/admin/login", json={"key": ADMIN}).status_code == 401


def run_cli(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLOOP_")}
    e.update(AGENTLOOP_HOME=str(home), **(env or {}))
    return subprocess.run([sys.executable, "-m", "agentloop.serve.cli", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def keys_cli(tmp_path, monkeypatch, capsys):
    """`agentloop keys ...` in this process (the subprocess form is tested once below): (rc, stdout, stderr)."""
    for k in list(os.environ):
        if k.startswith("AGENTLOOP_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AGENTLOOP_HOME", str(tmp_path))

    def run(*args: str, admin_key: str | None = None):
        if admin_key:
            monkeypatch.setenv("AGENTLOOP_ADMIN_KEY", admin_key)
        try:
            rc = cli.main(["keys", *args])
        finally:
            monkeypatch.delenv("AGENTLOOP_ADMIN_KEY", raising=False)
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def test_keys_cli_stores_only_hashes_and_manages_keys(tmp_path, keys_cli):
    r = run_cli(tmp_path, "keys", "create", "--name", "alice", "--rpm", "5", "--max-streams", "2",
                "--max-body-bytes", "4096", "--max-tokens", "64")
    assert r.returncode == 0, r.stderr
    raw = r.stdout.strip()
    assert raw.startswith("al-") and len(raw) >= 40 and "\n" not in raw
    assert "only time the key is shown" in r.stderr and "first active key" in r.stderr
    assert keys_cli("create", "--name", "mallory", "--untrusted")[0] == 0
    with Store(db_url(tmp_path)) as s:
        alice, mallory = s.list_keys()
        assert s.untrusted_callers() == [mallory["caller"]]
    assert (alice["name"], alice["rpm"], alice["max_streams"], alice["max_body_bytes"], alice["max_tokens"],
            alice["trusted"]) == ("alice", 5, 2, 4096, 64, True)
    rc, out, _ = keys_cli("list")
    assert rc == 0 and alice["id"] in out and "UNTRUSTED" in out
    assert raw not in out and raw[-4:] in out  # a hint, never the key
    # Only the hash is stored, in the database and its WAL alike.
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("agentloop.db*"))
    assert raw.encode() not in stored and hashlib.sha256(raw.encode()).hexdigest().encode() in stored

    assert keys_cli("trust", mallory["id"])[0] == 0
    assert keys_cli("untrust", alice["id"])[0] == 0
    with Store(db_url(tmp_path)) as s:
        assert s.untrusted_callers() == [alice["caller"]]
    rc, out, _ = keys_cli("revoke", alice["id"])
    assert rc == 0 and "revoked" in out
    assert keys_cli("revoke", alice["id"])[0] == 0  # idempotent
    rc, _, err = keys_cli("revoke", "key_nope")
    assert rc == 1 and "no API key 'key_nope'" in err
    # Importing an existing bearer; never one equal to the admin key, never a short one, never twice.
    rc, _, err = keys_cli("create", "--name", "x", "--key", ADMIN, admin_key=ADMIN)
    assert rc == 1 and "equal to AGENTLOOP_ADMIN_KEY" in err
    assert keys_cli("create", "--name", "x", "--key", "short")[0] == 1
    rc, _, err = keys_cli("create", "--name", "again", "--key", raw)
    assert rc == 1 and "already exists" in err  # a revoked key cannot come back
    rc, out, _ = keys_cli("limits", mallory["id"], "--rpm", "7")
    assert rc == 0 and "rpm=7" in out
    rc, out, _ = keys_cli("list", "--active", "--json")
    assert rc == 0 and [k["id"] for k in json.loads(out)] == [mallory["id"]]


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    """Before anything starts (no engine, no model): one clear line and exit code 2."""
    r = run_cli(tmp_path, "serve", "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("agentloop: refusing to serve on 0.0.0.0 without API keys") and "--open" in last
