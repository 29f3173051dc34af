"""Session fixtures: one real gateway process supervising one real vLLM CPU server.

The server runs the tiny model that tests/tiny_model.py builds (cached), so
outputs are deterministic under greedy decoding. It is started once per test
session through the real CLI (`python -m agentloop.serve.cli serve`), exactly as a user
would start it, and stopped with SIGTERM at the end (which must leave no
orphan engine behind — test_gateway checks that too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key"


# Fixtures that bring up a real engine or model: a test using one is marked `engine`,
# so `pytest -m "not engine"` runs the unit part alone (README, "Tests").
ENGINE_FIXTURES = {"server", "tiny_model"}


# Modules that load vLLM, torch or a model when imported or in every test (each also says
# `pytestmark = pytest.mark.engine`). A run that leaves `engine` out does not even import
# them: their imports alone cost ~17 s of collection on this machine.
ENGINE_MODULES = {"test_default_model.py", "test_default_model_serving.py", "test_lora_bleed.py",
                  "test_lora_kernels.py", "test_rl_training.py", "test_shared_prefix.py", "test_think_end.py",
                  "test_vllm_plugin.py"}


def _engine_excluded(config) -> bool:
    expr = config.getoption("markexpr") or ""
    if "engine" not in expr:
        return False
    from _pytest.mark.expression import Expression  # pytest's own -m evaluator

    return not Expression.compile(expr).evaluate(lambda name: name == "engine")


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in ENGINE_MODULES and _engine_excluded(config):
        return True
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noisy_adapter(base: Path, dst: Path, *, seed: int = 1, scale: float = 0.5) -> Path:
    """A copy of the zero adapter `base` with random B matrices: it changes every answer,
    which makes it easy to see which adapter served a request."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_bytes((base / "adapter_config.json").read_bytes())
    tensors = load_file(str(base / "adapter_model.safetensors"))
    rng = np.random.default_rng(seed)
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = rng.normal(0, scale, tensors[k].shape).astype(np.float32)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Server:
    url: str            # gateway base url, e.g. http://127.0.0.1:1234
    engine_url: str     # the supervised vLLM server (loopback), for direct comparisons
    home: Path
    proc: subprocess.Popen
    model_dir: Path
    manifest: dict

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def adapters_root(self) -> Path:
        (base,) = list(self.home.glob("adapters/*/v0000"))
        return base.parent

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kw.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kw)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.home / 'agentloop.db'}?mode=ro", uri=True, timeout=10)

    def wait_row(self, completion_id: str, timeout: float = 10.0) -> dict:
        """The request log is written off the response path: poll for the row."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db() as con:
                con.row_factory = sqlite3.Row
                r = con.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
            if r is not None:
                return dict(r)
            time.sleep(0.1)
        raise AssertionError(f"no log row for {completion_id} after {timeout}s")


def start_gateway(home: Path, model_dir: Path | None, *, extra: list[str] | None = None,
                  timeout: float = 600.0, port: int | None = None,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start `agentloop serve` on `home` and wait until it is ready. With `extra=["--engine-url", URL]`
    and no model it attaches to a running engine instead of starting one; `port` reuses a port
    (a restart on the same address); `env` adds settings (AGENTLOOP_*)."""
    port, engine_port = port or free_port(), free_port()
    env = {**os.environ, "AGENTLOOP_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "AGENTLOOP_HEALTH_INTERVAL": "0.5", "AGENTLOOP_ADMIN_KEY": ADMIN_KEY, **(env or {})}
    log = open(home / "gateway.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentloop.serve.cli", "serve", "--port", str(port), "--engine-port", str(engine_port),
         *(["--model", str(model_dir)] if model_dir else []), "--log-level", "warning", *(extra or [])],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {home / 'gateway.log'}")
        try:
            h = httpx.get(f"{url}/health", timeout=2).json()
            if h.get("ready"):
                return proc, url, f"http://127.0.0.1:{engine_port}"
            if str(h.get("boot", "")).startswith("failed"):
                stop_gateway(proc)
                raise RuntimeError(f"engine boot failed: {h['boot']}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_gateway(proc)
    raise RuntimeError(f"gateway not ready after {timeout}s; see {home}")


def stop_gateway(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from tests.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory) -> Server:
    home = tmp_path_factory.mktemp("agentloop-home")
    # The engine's copies of adapters it fetched by URL (adapter_fetch): off the user's cache.
    engine_cache = tmp_path_factory.mktemp("engine-adapters")
    proc, url, engine_url = start_gateway(home, tiny_model, env={"AGENTLOOP_ENGINE_ADAPTER_DIR": str(engine_cache)})
    manifest = json.loads((tiny_model / "tiny_manifest.json").read_text())
    srv = Server(url=url, engine_url=engine_url, home=home, proc=proc, model_dir=tiny_model, manifest=manifest)
    yield srv
    engine_port = int(engine_url.rsplit(":", 1)[1])
    code = stop_gateway(proc)
    # A clean stop (SIGTERM) must take the supervised engine down with it.
    # uvicorn re-raises the signal after its graceful shutdown, hence -SIGTERM.
    assert code in (0, -signal.SIGTERM), f"gateway exited with {code}"
    assert not port_open(engine_port), "the vLLM engine outlived the gateway (orphan)"


@pytest.fixture
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0, timeout=120)


# ---------------------------------------------------------------- PostgreSQL
# One throwaway server per session (tests/pgcluster.py), a fresh database per test.
# Store tests take `db_url`, parametrised over both dialects, so the same test runs
# on SQLite and on PostgreSQL. No skip when the server is missing: that is an error.

@pytest.fixture(scope="session")
def pg_cluster():
    from tests.pgcluster import ExternalCluster, start_cluster

    external = os.environ.get("AGENTLOOP_TEST_DATABASE_URL")
    cluster = ExternalCluster(external) if external else start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path: Path) -> str:
    """A store URL on a fresh, empty database of each dialect."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'agentloop.db'}"
    return request.getfixturevalue("pg_url")
