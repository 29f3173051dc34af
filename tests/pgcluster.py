"""A throwaway PostgreSQL server for the tests: `initdb` + `pg_ctl` in a temp folder.

One cluster per test session (conftest's `pg_cluster` fixture), one fresh
database per test (`PgCluster.new_database`), so PostgreSQL tests are isolated
without paying a server start each. The server listens on loopback on a free
port, with `trust` authentication (only this machine's processes reach it) and
its Unix socket inside the temp folder, so it never collides with a system
server.

Binaries: `AGENTLOOP_TEST_PG_BIN`, else `pg_config --bindir`, else Debian's
/usr/lib/postgresql/<N>/bin (`apt-get install postgresql`; .ci/setup does it).
A missing server is an error, never a skip: CI must run these tests.
`AGENTLOOP_TEST_DATABASE_URL` points the tests at an existing server instead
(a `postgresql+psycopg://` URL of a role that may create databases).

`initdb` refuses to run as root, so as root the cluster runs as the `postgres`
user (`runuser`), in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


class PostgresMissing(RuntimeError):
    pass


def pg_bindir() -> Path:
    env = os.environ.get("AGENTLOOP_TEST_PG_BIN")
    if env:
        return Path(env)
    cfg = shutil.which("pg_config")
    if cfg:
        out = subprocess.run([cfg, "--bindir"], capture_output=True, text=True)
        d = Path(out.stdout.strip())
        if (d / "initdb").exists():
            return d
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    raise PostgresMissing(
        "PostgreSQL server binaries not found (initdb, pg_ctl). Install them (`apt-get install postgresql`, "
        "which .ci/setup does), set AGENTLOOP_TEST_PG_BIN to their folder, or AGENTLOOP_TEST_DATABASE_URL "
        "to an existing server.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A running throwaway cluster. `admin_url` is a SQLAlchemy URL of its superuser."""

    def __init__(self, root: Path | None = None):
        self.bindir = pg_bindir()
        self.root = Path(root or tempfile.mkdtemp(prefix="agentloop-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        self.user = "postgres" if self.as_postgres else (os.environ.get("USER") or "postgres")
        self.log = self.root / "server.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)

    def init(self) -> "PgCluster":
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o755)
        # fsync off: a test server need not survive a power cut, and initdb and every
        # commit get much faster. The store's own durability claims are about the
        # server's semantics, which do not change.
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        return self

    def start(self) -> "PgCluster":
        opts = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False, timeout=10)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL not ready after {timeout}s; see {self.log}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Stop the server at once (immediate mode: no checkpoint, clients cut off)."""
        self.stop("immediate")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        create_database(self.admin_url, name)
        return self.url(name)


def create_database(admin_url: str, name: str) -> None:
    import psycopg

    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def start_cluster() -> PgCluster:
    cluster = PgCluster().init()
    try:
        return cluster.start()
    except Exception:
        shutil.rmtree(cluster.root, ignore_errors=True)
        raise


class ExternalCluster:
    """An existing server (AGENTLOOP_TEST_DATABASE_URL): databases are created on it, never dropped."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url

    def new_database(self, prefix: str = "t") -> str:
        from sqlalchemy.engine import make_url

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        create_database(self.admin_url, name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def restart(self) -> None:
        raise RuntimeError("an external PostgreSQL server cannot be restarted by the tests")

    def destroy(self) -> None:
        pass
