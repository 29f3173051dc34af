"""One gateway at a time for the side-by-side benches: start it on a model with some settings, stop it.

`gateway(model_dir, env=..., extra=...)` yields the gateway's base URL while it runs
(tests.conftest.start_gateway: the real CLI, a supervised engine, a fresh home) and stops it,
engine and all, however the block ends. `env` holds AGENTLOOP_* settings for this gateway
only; `extra` more `agentloop serve` flags (e.g. `--engine-arg`); `home` its AGENTLOOP_HOME,
when the caller needs to reach into it (its adapter registry), else a fresh temp folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def gateway(model_dir: Path, *, env: dict[str, str] | None = None, extra: list[str] | None = None,
            home: Path | None = None) -> Iterator[str]:
    from tests.conftest import start_gateway, stop_gateway

    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    home = home or Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    try:
        proc, url, _ = start_gateway(home, model_dir, extra=extra)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield url
    finally:
        stop_gateway(proc)
