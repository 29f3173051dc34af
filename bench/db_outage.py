"""A PostgreSQL outage under a real gateway: what clients see while it lasts, and how it ends.

Owns the "Database outage" benchmark (issue 29). One run starts a throwaway PostgreSQL
server (tests/pgcluster.py) and one `agentloop serve` on it (the tiny test model: the engine
plays no part in this), then, per round, stops the server (`fast`: a clean shutdown, as a
restart does; `immediate`: a crash, connections cut), keeps asking through the outage, and
starts it again on the same port and data:
- feedback (needs the database) before, during and after: status and seconds per call;
- chat completions (need none) during: status and seconds, streamed and not;
- after the start: seconds until feedback is answered 200 again (the gateway reconnects by
  itself) and until the request log has written every row of the outage
  (`agentloop_log_pending` back to 0), and whether every completion is in the database.
Writes docs/benchmarks.md "## Database outage" (its generated block only).

    .venv/bin/python -m bench.db_outage                # ~2 min
    .venv/bin/python -m bench.db_outage --outage 5 --no-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import write_run  # noqa: E402
from bench.gateways import gateway  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Database outage"
USER = {"Authorization": "Bearer bench-user"}
MSG = [{"role": "user", "content": "Hello"}]


def timed(fn) -> tuple[int, float]:
    t = time.perf_counter()
    try:
        code = fn().status_code
    except httpx.HTTPError:
        code = 0  # no answer at all (timeout, reset): the worst case, counted as such
    return code, time.perf_counter() - t


def chat(url: str, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=USER, timeout=60,
                      json={"model": "agentloop", "messages": MSG, "max_tokens": 8, "temperature": 0, "stream": stream})


def feedback(url: str, cid: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", headers=USER, timeout=60,
                      json={"completion_id": cid, "type": "rating", "value": 4})


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} not in /metrics")


def summary(calls: list[tuple[int, float]]) -> str:
    codes: dict[int, int] = {}
    for code, _ in calls:
        codes[code] = codes.get(code, 0) + 1
    shown = ", ".join(f"{n}x {c}" for c, n in sorted(codes.items()))
    secs = [s for _, s in calls]
    return f"{shown}; median {statistics.median(secs):.3f} s, max {max(secs):.3f} s"


def one_round(url: str, cluster, mode: str, outage: float) -> dict:
    cid = chat(url).json()["id"]
    out = {"before": [timed(lambda: feedback(url, cid)) for _ in range(5)]}
    cluster.stop(mode)
    down_at = time.monotonic()
    out["during feedback"], out["during chat"], out["during stream"], made = [], [], [], []
    while time.monotonic() - down_at < outage:
        out["during feedback"].append(timed(lambda: feedback(url, cid)))
        r = chat(url)
        out["during chat"].append((r.status_code, r.elapsed.total_seconds()))
        if r.status_code == 200:
            made.append(r.json()["id"])
        out["during stream"].append(timed(lambda: chat(url, stream=True)))
    cluster.start()
    up_at = time.monotonic()
    while feedback(url, cid).status_code != 200:
        if time.monotonic() - up_at > 120:
            raise SystemExit("feedback not answered 200 within 120 s of the database's start")
        time.sleep(0.05)
    out["reconnect"] = time.monotonic() - up_at
    while metric(url, "agentloop_log_pending") > 0:  # queued, in a retry, or a dead letter
        if time.monotonic() - up_at > 300:
            raise SystemExit("the outage's log rows were not written within 300 s")
        time.sleep(0.1)
    out["log written"] = time.monotonic() - up_at
    out["completions made"] = len(made)
    out["dropped"] = metric(url, "agentloop_log_dropped_rows")
    out["made"] = made
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outage", type=float, default=15.0, help="seconds the server stays down per round")
    p.add_argument("--no-docs", action="store_true", help=f"do not write {DOCS.relative_to(ROOT)}")
    args = p.parse_args()
    from agentloop.serve.settings import Settings
    from agentloop.serve.store.db import Store
    from tests.pgcluster import start_cluster
    from tests.tiny_model import ensure_tiny_model

    t0 = time.monotonic()
    cluster = start_cluster()
    timeout = Settings.model_fields["db_connect_timeout"].default
    rows = []
    try:
        db = cluster.new_database()
        with gateway(ensure_tiny_model(), env={"AGENTLOOP_DATABASE_URL": db}) as url:
            for mode in ("fast", "immediate"):
                r = one_round(url, cluster, mode, args.outage)
                with Store(db) as store:
                    logged = sum(store.get_completion(c) is not None for c in r["made"])
                rows.append(f"| {mode} | {summary(r['before'])} | {summary(r['during feedback'])} | "
                            f"{summary(r['during chat'])} | {summary(r['during stream'])} | {r['reconnect']:.2f} s | "
                            f"{r['log written']:.2f} s | {logged}/{r['completions made']} | {r['dropped']:.0f} |")
                print(rows[-1], flush=True)
    finally:
        cluster.destroy()
    body = "\n".join(["| stop mode | feedback before | feedback during | chat during | stream during | "
                      "feedback 200 again after start | outage's log rows written after start | "
                      "outage's completions in the database | log rows dropped |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows])
    print(body)
    if not args.no_docs:
        write_run(DOCS, SECTION, "bench.db_outage", (
            f"One `agentloop serve` (tiny test model) on a throwaway PostgreSQL 15 server "
            f"(`AGENTLOOP_DATABASE_URL`, `db_connect_timeout` {timeout} s); per round the server is stopped "
            f"(`pg_ctl -m fast`, or `immediate`: a crash) for {args.outage:.0f} s while a client keeps sending "
            f"feedback and chat completions (8 tokens), then started again on the same port and data. Status "
            f"codes and seconds per call; after the start, seconds until feedback is answered 200 again and "
            f"until the request log has no row left to write."), body, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
