"""Steady load: chat requests and feedback for N minutes, and the gateway's memory and file descriptors.

Owns the load (a fixed number of workers, each in a loop: a streamed chat
completion -- every 7th one abandoned by the client after its first chunk --
then a thumbs feedback on it with an Idempotency-Key, and now and then a
non-streamed request and a feedback listing) and the measurement: a sampler
thread reads RSS and open file descriptors of the gateway process and of the
engine's process tree every few seconds, and the least-squares slope after
warm-up (MB/min, fds/min) is printed next to the bound it is checked against.

Invariant checked: after warm-up the gateway's RSS slope stays under
--max-rss-slope MB/min and its fds, once the load stops and the connections
close, are back to their idle count after warm-up, kind by kind (sockets,
pipes, files), except SQLite handles, which its connection pool bounds.
Exit status 1 if not. The engine's figures are printed for reference.

    .venv/bin/python -m bench.steady_load --minutes 5            # starts a gateway on the tiny model
    .venv/bin/python -m bench.steady_load --gateway http://127.0.0.1:8000 --minutes 10

tests/test_faults.py runs the same measurement for about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- processes and samples

def listening_pid(port: int) -> int | None:
    """The local process listening on `port` (how a gateway or engine is found from its URL)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def usage(procs: list[psutil.Process]) -> tuple[float, int]:
    """(RSS in MB, open fds) summed over `procs`; processes that vanished count 0."""
    rss, fds = 0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.Error:
            pass
    return rss / 2**20, fds


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors of `pid` by kind (socket, pipe, anon inode, or the file's suffix), so a
    change in the count says what changed: a connection, or a database file."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target and not target.startswith("/") else \
            ("db" + target.rsplit(".db", 1)[1] if ".db" in target else "file")
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


# The store's SQLAlchemy pool (QueuePool, pool_size 5) keeps up to 5 idle SQLite connections,
# each holding the database file and its WAL open: idle "db" fds may rise to 5 as load first
# needs them, and no further. Every other kind must come back to its idle count.
SQLITE_POOL = 5


def fds_back(before: dict[str, int], after: dict[str, int], slack: int = 0) -> tuple[bool, str]:
    """Whether the idle fds after a load are back to `before` (SQLite's pool aside); and why not."""
    bad = [f"{k} {before.get(k, 0)} -> {n}" for k, n in after.items()
           if k not in ("db", "db-wal") and n > before.get(k, 0) + slack]
    bad += [f"{k} {n} > pool {SQLITE_POOL}" for k, n in after.items() if k in ("db", "db-wal") and n > SQLITE_POOL]
    return not bad, ", ".join(bad)


@dataclass
class Series:
    points: list[tuple[float, float, int]] = field(default_factory=list)  # (seconds, rss MB, fds)

    def since(self, t0: float) -> "Series":
        return Series([p for p in self.points if p[0] >= t0])


class Sampler(threading.Thread):
    """Samples named process groups every `interval` s; `groups` maps a name to a function
    returning the processes (re-resolved each time: an engine may be restarted)."""

    def __init__(self, groups: dict, interval: float):
        super().__init__(daemon=True, name="sampler")
        self.groups, self.interval = groups, interval
        self.series = {name: Series() for name in groups}
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        for name, procs in self.groups.items():
            try:
                rss, fds = usage(procs())
            except psutil.Error:
                continue
            self.series[name].points.append((now, rss, fds))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def slope_per_minute(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per minute."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def slopes(s: Series) -> tuple[float, float]:
    xs = [p[0] for p in s.points]
    return slope_per_minute(xs, [p[1] for p in s.points]), slope_per_minute(xs, [p[2] for p in s.points])


# ---------------------------------------------------------------- load

@dataclass
class Counts:
    requests: int = 0
    aborted: int = 0
    feedback: int = 0
    listings: int = 0
    errors: list[str] = field(default_factory=list)


async def _worker(client: httpx.AsyncClient, url: str, w: int, until: float, c: Counts, max_tokens: int) -> None:
    headers = {"Authorization": f"Bearer steady-user-{w % 3}"}
    i = 0
    while time.monotonic() < until:
        i += 1
        stream = i % 5 != 0
        abort = stream and i % 7 == 0
        body = {"model": "agentloop", "stream": stream, "temperature": 0, "max_tokens": max_tokens,
                "ignore_eos": True, "messages": [{"role": "user", "content": f"Worker {w} asks question {i}."}]}
        cid, done = None, not stream
        try:
            if stream:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        c.errors.append(f"chat {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and cid is None:
                            cid = json.loads(line[6:])["id"]
                            if abort:
                                break  # the client goes away mid-stream
                        done = done or line == "data: [DONE]"
            else:
                r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    c.errors.append(f"chat {r.status_code}: {r.text[:200]}")
                    continue
                cid = r.json()["id"]
            c.requests += 1
            if abort:
                c.aborted += 1
                continue
            if not done or cid is None:
                c.errors.append(f"stream {cid} ended without [DONE]")
                continue
            r = await client.post(f"{url}/v1/feedback", headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
                                  json={"completion_id": cid, "type": "thumbs", "value": 1 if i % 2 else -1})
            if r.status_code != 200:
                c.errors.append(f"feedback {r.status_code}: {r.text[:200]}")
            else:
                c.feedback += 1
            if i % 10 == 0:
                r = await client.get(f"{url}/v1/feedback", params={"limit": 5}, headers=headers)
                c.listings += r.status_code == 200
        except httpx.HTTPError as e:
            c.errors.append(f"{type(e).__name__}: {e}")


async def load(url: str, seconds: float, *, concurrency: int, max_tokens: int, counts: Counts) -> None:
    """`concurrency` workers for `seconds`; one client per phase, closed at the end (so its
    connections close and the gateway's descriptors for them must go too)."""
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(_worker(client, url, w, until, counts, max_tokens) for w in range(concurrency)))


@dataclass
class Result:
    counts: Counts
    series: dict[str, Series]
    measured_from: float       # sampler seconds where the post-warm-up window starts
    measured_to: float
    idle_fds_before: int       # gateway fds at idle after warm-up
    idle_fds_after: int        # ... and after the measured load
    rss_before: float          # gateway RSS at idle after warm-up (MB)
    rss_after: float
    kinds_before: dict         # the idle fds by kind (fd_kinds)
    kinds_after: dict


def wait_idle_fds(procs, target: int | None, timeout: float) -> int:
    """The gateway's fd count once its connections have closed: polls until it stops dropping
    (or reaches `target`), so a loaded machine's slow socket teardown is not counted as a leak."""
    deadline = time.monotonic() + timeout
    best = usage(procs())[1]
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        fds = usage(procs())[1]
        if fds < best:
            best, stable_since = fds, time.monotonic()
        if (target is not None and best <= target) or time.monotonic() - stable_since > 5:
            break
    return best


def measure(url: str, gateway_pid: int, engine_pid: int | None, *, warmup: float, seconds: float,
            concurrency: int = 4, max_tokens: int = 16, interval: float = 2.0, fd_target: int | None = None,
            log=print) -> Result:
    """Warm up, note the idle fds, run the measured load while sampling, note the idle fds again."""
    gw = lambda: [psutil.Process(gateway_pid)]  # noqa: E731
    groups = {"gateway": gw}
    if engine_pid is not None:
        groups["engine"] = lambda: tree(engine_pid)
    warm, counts = Counts(), Counts()  # the figures printed are the measured window's
    sampler = Sampler(groups, interval)
    sampler.start()
    try:
        log(f"warm-up: {warmup:.0f} s, {concurrency} workers")
        asyncio.run(load(url, warmup, concurrency=concurrency, max_tokens=max_tokens, counts=warm))
        idle_before = wait_idle_fds(gw, None, 30)
        rss_before, kinds_before = usage(gw())[0], fd_kinds(gateway_pid)
        # The window starts one sample into the load: the idle sample before it is not "growth".
        t_from = time.monotonic() - sampler.t0 + interval
        log(f"measured load: {seconds:.0f} s (idle after warm-up: {idle_before} fds, {rss_before:.1f} MB)")
        asyncio.run(load(url, seconds, concurrency=concurrency, max_tokens=max_tokens, counts=counts))
        t_to = time.monotonic() - sampler.t0
        idle_after = wait_idle_fds(gw, fd_target if fd_target is not None else idle_before, 60)
        rss_after, kinds_after = usage(gw())[0], fd_kinds(gateway_pid)
    finally:
        sampler.stop()
    counts.errors[:0] = [f"(warm-up) {e}" for e in warm.errors]
    window = {name: Series([p for p in s.points if t_from <= p[0] <= t_to]) for name, s in sampler.series.items()}
    return Result(counts, {**sampler.series, **{f"{k}/measured": v for k, v in window.items()}}, t_from, t_to,
                  idle_before, idle_after, rss_before, rss_after, kinds_before, kinds_after)


def report(res: Result, minutes: float, max_rss_slope: float, fd_slack: int, log=print) -> bool:
    c = res.counts
    log(f"load: {c.requests} chat requests ({c.aborted} abandoned mid-stream), {c.feedback} feedback, "
        f"{c.listings} listings, {len(c.errors)} errors over {minutes:.1f} min measured")
    for e in c.errors[:5]:
        log(f"  error: {e}")
    ok = not c.errors
    for name in ("gateway", "engine"):
        s = res.series.get(f"{name}/measured")
        if not s or not s.points:
            continue
        rss_slope, fd_slope = slopes(s)
        rss = [p[1] for p in s.points]
        fds = [p[2] for p in s.points]
        # Halves apart: a slope that shrinks is warming up still, one that does not is a leak.
        half = len(s.points) // 2
        h1, h2 = slopes(Series(s.points[:half]))[0], slopes(Series(s.points[half:]))[0]
        line = (f"{name:8s} RSS {rss[0]:7.1f} -> {rss[-1]:7.1f} MB (min {min(rss):.1f}, max {max(rss):.1f}), "
                f"slope {rss_slope:+.3f} MB/min (halves {h1:+.3f}, {h2:+.3f});  fds {fds[0]} -> {fds[-1]} "
                f"(max {max(fds)}), slope {fd_slope:+.3f} fds/min;  {len(s.points)} samples")
        if name == "gateway":
            rss_ok = rss_slope <= max_rss_slope
            fd_ok, why = fds_back(res.kinds_before, res.kinds_after, fd_slack)
            ok = ok and rss_ok and fd_ok
            line += (f"\n         bound: RSS slope <= {max_rss_slope} MB/min: {'ok' if rss_ok else 'EXCEEDED'}; "
                     f"idle fds {res.idle_fds_before} after warm-up, {res.idle_fds_after} after the load: "
                     f"{'back (SQLite pool <= ' + str(SQLITE_POOL) + ')' if fd_ok else 'NOT BACK: ' + why}; "
                     f"idle RSS {res.rss_before:.1f} -> {res.rss_after:.1f} MB"
                     f"\n         idle fds by kind: after warm-up {res.kinds_before}, after the load {res.kinds_after}")
        log(line)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="length of the measured load")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before measuring")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    p.add_argument("--max-rss-slope", type=float, default=1.0, help="bound on the gateway's RSS slope, MB/min")
    p.add_argument("--fd-slack", type=int, default=0,
                   help="idle fds of a kind allowed above its idle count after warm-up (SQLite's pool aside)")
    p.add_argument("--gateway", help="URL of a running local gateway; default: start one on the tiny model")
    args = p.parse_args()
    proc = None
    if args.gateway:
        url = args.gateway.rstrip("/")
        engine_urls = [e["url"] for e in httpx.get(f"{url}/health", timeout=10).json()["engines"]]
    else:
        from tests.conftest import start_gateway
        from tests.tiny_model import ensure_tiny_model

        home = Path(tempfile.mkdtemp(prefix="agentloop-steady-"))
        proc, url, engine = start_gateway(home, ensure_tiny_model())
        engine_urls = [engine]
    try:
        gateway_pid = listening_pid(urlsplit(url).port)
        engine_pid = listening_pid(urlsplit(engine_urls[0]).port) if engine_urls else None
        if gateway_pid is None:
            raise SystemExit(f"no local process listens on {url}")
        res = measure(url, gateway_pid, engine_pid, warmup=args.warmup, seconds=args.minutes * 60,
                      concurrency=args.concurrency, max_tokens=args.max_tokens, interval=args.interval)
    finally:
        if proc is not None:
            from tests.conftest import stop_gateway

            stop_gateway(proc)
    ok = report(res, args.minutes, args.max_rss_slope, args.fd_slack)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
