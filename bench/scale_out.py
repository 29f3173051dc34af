"""Two gateways, one live version: how long a promotion takes to reach every gateway.

Owns the "Scale-out" benchmark (issue 30). Per database (a throwaway PostgreSQL 15 server,
tests/pgcluster.py, and a SQLite file), gateway A supervises an engine (the tiny test model
unless --model) and gateway B, with its own home, attaches to that engine; both share the
database and a registry URL (`AGENTLOOP_REGISTRY_URL`, a file:// folder: A publishes a version
there on its first promotion, B fetches its own copy). One client per gateway sends
short chat completions back to back (1 token) while A is asked, round after round, to
promote another of two trained versions. Per round:
- the promote call through A (HTTP round trip: verify, load, publish, flip);
- promote → first response on the new version, per gateway (from the start of the promote
  call to the end of the first response that names the new version), and the last gateway;
- the same for the last gateway from the promote call's return (the change is committed then);
- responses that failed (anything but 200) over the whole run.
Beside them, the same on one gateway alone (SQLite, no registry URL): what a promotion costs
without scale-out.
Writes docs/benchmarks.md "## Scale-out" (its generated block only).

    .venv/bin/python -m bench.scale_out                  # ~4 min
    .venv/bin/python -m bench.scale_out --rounds 5 --no-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import write_run  # noqa: E402
from bench.gateways import gateway  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Scale-out"
ADMIN = {"Authorization": "Bearer test-admin-key"}  # tests.conftest.ADMIN_KEY, which start_gateway sets
MSG = [{"role": "user", "content": "Hello"}]


class Client:
    """Back-to-back requests through one gateway: (finished at, status, model) of each."""

    def __init__(self, url: str):
        self.url = url
        self.done: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(f"{self.url}/v1/chat/completions",
                               json={"model": "agentloop", "messages": MSG, "max_tokens": 1, "temperature": 0})
                    self.done.append((time.monotonic(), r.status_code, r.json().get("model", "")))
                except (httpx.HTTPError, ValueError):
                    self.done.append((time.monotonic(), 0, ""))

    def first(self, model: str, since: float) -> float | None:
        return next((at for at, code, m in list(self.done) if at > since and code == 200 and m == model), None)

    def failed(self) -> int:
        return sum(code != 200 for _, code, _ in self.done)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} / {pct(xs, 0.99) * 1000:.0f} ms"


def commit_versions(home: Path, tmp: Path) -> list[str]:
    """Two trained versions in gateway A's own registry (as its trainer leaves them)."""
    from agentloop.rl.registry import AdapterRegistry
    from tests.conftest import noisy_adapter

    (root,) = {p.parent for p in home.glob("adapters/*/v0000")}
    reg = AdapterRegistry(root)
    base = reg.get("v0000").base_model
    return [reg.commit(noisy_adapter(root / "v0000", tmp / f"noisy-{seed}", seed=seed), parent="v0000",
                       base_model=base, template="chatml-tools", method="bench").version for seed in (1, 2)]


def one_setup(name: str, db_url: str, model: Path, rounds: int, *, second: bool = True) -> dict:
    """`rounds` promotions through A under traffic; with `second`, B beside it on the same engine,
    database and registry URL (without, A alone and no registry URL: the single-gateway baseline)."""
    from tests.conftest import start_gateway, stop_gateway

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-scale-{name}-"))
    registry = tmp / "registry"
    env = {"AGENTLOOP_DATABASE_URL": db_url, **({"AGENTLOOP_REGISTRY_URL": registry.as_uri()} if second else {})}
    (tmp / "a").mkdir(), (tmp / "b").mkdir()
    proc = None
    with gateway(model, env=env, home=tmp / "a") as a:
        try:
            urls = {"A": a}
            if second:
                engine_url = httpx.get(f"{a}/health").json()["engines"][0]["url"]
                proc, urls["B"], _ = start_gateway(tmp / "b", None, extra=["--engine-url", engine_url], env=env,
                                                   timeout=300)
            versions = commit_versions(tmp / "a", tmp)
            clients = {g: Client(u) for g, u in urls.items()}
            time.sleep(1.0)
            for v in versions:  # warm-up, not measured: an adapter's first load in the engine costs once
                httpx.post(f"{a}/admin/promote", json={"version": v}, headers=ADMIN, timeout=120).raise_for_status()
                time.sleep(0.5)
            calls, lags, after = [], {g: [] for g in (*urls, "last")}, []
            for i in range(rounds):
                v = versions[i % 2]
                t0 = time.monotonic()
                r = httpx.post(f"{a}/admin/promote", json={"version": v}, headers=ADMIN, timeout=120)
                r.raise_for_status()
                returned = time.monotonic()
                calls.append(returned - t0)
                deadline = time.monotonic() + 30
                firsts: dict[str, float | None] = {}
                while time.monotonic() < deadline:
                    firsts = {g: c.first(f"agentloop@{v}", t0) for g, c in clients.items()}
                    if all(firsts.values()):
                        break
                    time.sleep(0.01)
                for g, at in firsts.items():
                    lags[g].append((at - t0) if at else float("inf"))
                lags["last"].append(max(lags[g][-1] for g in urls))
                after.append(max(0.0, lags["last"][-1] - (returned - t0)))
                time.sleep(0.5)  # let the replaced version drain and retire before the next round
            failed = sum(c.failed() for c in clients.values())
            served = sum(len(c.done) for c in clients.values())
            for c in clients.values():
                c.stop()
        finally:
            if proc is not None:
                stop_gateway(proc)
    return {"calls": calls, "lags": lags, "after": after, "failed": failed, "served": served}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="promotions per database")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny test model)")
    p.add_argument("--no-docs", action="store_true", help=f"do not write {DOCS.relative_to(ROOT)}")
    args = p.parse_args()
    from tests.pgcluster import start_cluster
    from tests.tiny_model import ensure_tiny_model

    t0 = time.monotonic()
    model = args.model or ensure_tiny_model()
    rows = []
    cluster = start_cluster()
    try:
        sqlite = Path(tempfile.mkdtemp(prefix="bench-scale-sqlite-")) / "agentloop.db"
        alone = Path(tempfile.mkdtemp(prefix="bench-scale-alone-")) / "agentloop.db"
        for name, url, second in (("one gateway: SQLite, no registry URL", f"sqlite:///{alone}", False),
                                  ("two: PostgreSQL (LISTEN/NOTIFY)", cluster.new_database(), True),
                                  ("two: SQLite (0.1 s poll)", f"sqlite:///{sqlite}", True)):
            r = one_setup(name.split()[1].strip(":").lower(), url, model, args.rounds, second=second)
            lags = r["lags"]
            b = ms(lags["B"]) if "B" in lags else "–"
            rows.append(f"| {name} | {ms(r['calls'])} | {ms(lags['A'])} | {b} | {ms(lags['last'])} | "
                        f"{max(lags['last']) * 1000:.0f} ms | {ms(r['after'])} | {r['failed']} of {r['served']} |")
            print(rows[-1], flush=True)
    finally:
        cluster.destroy()
    body = "\n".join([
        "| gateways and database | promote call through A, p50 / p99 | promote → first response on the new version: A, "
        "p50 / p99 | B, p50 / p99 | last gateway, p50 / p99 | last gateway, max | last gateway after the call "
        "returned, p50 / p99 | failed responses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows])
    print(body)
    if not args.no_docs:
        write_run(DOCS, SECTION, "bench.scale_out", (
            f"Two `agentloop serve` on one database and one registry URL (file://): A supervises the engine "
            f"({'the tiny test model' if args.model is None else args.model.name}), B attaches to it with its own "
            f"home. One client per gateway sends 1-token chat completions back to back while A promotes one of "
            f"two trained versions, {args.rounds} rounds per setup after one unmeasured promotion of each (an "
            f"adapter's first load costs once). Times from the start of the promote call to the end of the first "
            f"response naming the new version; the last column from the promote call's return (the change "
            f"committed) instead."), body, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
