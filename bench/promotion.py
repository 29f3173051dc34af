"""Promotion under load: latency of a swap and what users see while it happens.

Starts a gateway on the tiny test model (or attaches with --gateway), commits
two adapters (the base and a random one), keeps a steady streaming load on
the alias, and promotes back and forth N times. For each promotion it
measures the time from the promote call to the first response served by the
new version. It counts failed requests and version mix-ups (a stream whose
chunks name more than one version, or whose log row names another version).

    .venv/bin/python -m bench.promotion --promotions 20 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentloop.rl.registry import AdapterRegistry  # noqa: E402
from tests.conftest import ADMIN_KEY, noisy_adapter, start_gateway, stop_gateway  # noqa: E402

MSG = [{"role": "user", "content": "Hello"}]
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def make_version(home: Path) -> str:
    (base,) = list(home.glob("adapters/*/v0000"))
    tmp = noisy_adapter(base, Path(tempfile.mkdtemp()) / "noisy", seed=0)
    reg = AdapterRegistry(base.parent)
    return reg.commit(tmp, parent="v0000", base_model=reg.get("v0000").base_model, method="bench").version


class Load:
    def __init__(self, url: str):
        self.url = url
        self.ok = self.failed = self.mixups = 0
        self.seen: list[tuple[float, str, str]] = []  # (first chunk time, model, id)
        self.stop = False

    async def worker(self, client: httpx.AsyncClient):
        body = {"model": "agentloop", "messages": MSG, "temperature": 0, "max_tokens": 16, "stream": True}
        while not self.stop:
            models, first, cid = set(), None, None
            try:
                async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        self.failed += 1
                        continue
                    done = False
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                self.failed += 1
                                break
                            first = first or time.monotonic()
                            models.add(chunk["model"])
                            cid = chunk["id"]
                        done = done or line == "data: [DONE]"
                    if not done:
                        self.failed += 1
                        continue
            except httpx.HTTPError:
                self.failed += 1
                continue
            self.ok += 1
            if len(models) != 1:
                self.mixups += 1
            else:
                self.seen.append((first, models.pop(), cid))


async def run(url: str, home: Path, args) -> dict:
    versions = ["v0000", make_version(home)]
    load = Load(url)
    latencies, calls = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        workers = [asyncio.create_task(load.worker(client)) for _ in range(args.concurrency)]
        await asyncio.sleep(2)
        for i in range(args.promotions):
            target = versions[(i + 1) % 2]
            t0 = time.monotonic()
            r = await client.post(f"{url}/admin/promote", json={"version": target}, headers=AUTH)
            r.raise_for_status()
            calls.append(time.monotonic() - t0)
            name = f"agentloop@{target}"
            while not any(t >= t0 and m == name for t, m, _ in load.seen[-64:]):
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(args.pause)
        load.stop = True
        await asyncio.gather(*workers)
        await client.post(f"{url}/admin/promote", json={"version": "v0000"}, headers=AUTH)
    # Each log row must name the version its stream named.
    time.sleep(1.5)
    con = sqlite3.connect(f"file:{home / 'agentloop.db'}?mode=ro", uri=True)
    logged = dict(con.execute("SELECT id, served_model FROM completions"))
    wrong_log = sum(1 for _, m, cid in load.seen if logged.get(cid) not in (None, m))
    missing = sum(1 for _, _, cid in load.seen if cid not in logged)
    return {"ok": load.ok, "failed": load.failed, "mixups": load.mixups + wrong_log, "missing_log": missing,
            "latencies": latencies, "calls": calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--promotions", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--pause", type=float, default=0.5, help="Seconds between promotions.")
    args = p.parse_args()
    from tests.tiny_model import ensure_tiny_model

    home = Path(tempfile.mkdtemp(prefix="agentloop-bench-"))
    proc, url, _ = start_gateway(home, ensure_tiny_model())
    try:
        res = asyncio.run(run(url, home, args))
    finally:
        stop_gateway(proc)
    lat = res["latencies"]
    print(f"load: {args.concurrency} concurrent streams on the alias; {args.promotions} promotions, "
          f"{args.pause}s apart")
    print(f"requests: {res['ok']} completed, {res['failed']} failed, {res['mixups']} version mix-ups, "
          f"{res['missing_log']} without a log row")
    print(f"promote call itself (verify, load into the engine, flip): p50 {pct(res['calls'], 50)*1000:.1f} ms, "
          f"p99 {pct(res['calls'], 99)*1000:.1f} ms")
    print(f"promotion latency (promote call -> first response on the new version): "
          f"p50 {pct(lat, 50)*1000:.1f} ms, p99 {pct(lat, 99)*1000:.1f} ms, max {max(lat)*1000:.1f} ms")


if __name__ == "__main__":
    main()
