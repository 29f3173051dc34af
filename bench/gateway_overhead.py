"""Gateway overhead: the same streaming load sent straight to vLLM and through the gateway.

Starts one gateway (supervising one vLLM CPU server) on the tiny test model, or
attaches to a running one with --gateway/--engine, then runs rounds that
alternate direct and gateway traffic (so drift in machine load hits both
sides alike): C concurrent streaming requests each, for R rounds. Prints
throughput (completion tokens/s), the ratio gateway/direct, and the added
p50/p99 of time-to-first-token and of total latency.

Under 32 concurrent streams the engine's batching dominates every latency, so
the added latency is also measured alone (`--pairs N`): N single streams one
at a time, each pair sent direct and through the gateway back to back (order
alternating), and the median of the per-pair differences is printed -- what
one request pays for the extra hop, free of the load's noise.

    .venv/bin/python -m bench.gateway_overhead --concurrency 32 --rounds 6 --pairs 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, i: int) -> tuple[float, float, int]:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Tell me a joke ({i})"}],
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, tokens


async def round_(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, url, model, max_tokens, i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "ttft": [r[0] for r in res], "lat": [r[1] for r in res], "tokens": sum(r[2] for r in res)}


async def paired(gateway: str, engine: str, pairs: int, max_tokens: int) -> dict:
    """Per-pair differences (gateway - direct) of TTFT and latency, single streams."""
    d_ttft, d_lat = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(pairs):
            sides = [(engine, "agentloop-base"), (gateway, "agentloop")]
            if i % 2:
                sides.reverse()
            res = {}
            for url, model in sides:
                res[url] = await one(client, url, model, max_tokens, i)
            d_ttft.append(res[gateway][0] - res[engine][0])
            d_lat.append(res[gateway][1] - res[engine][1])
    return {"pairs": pairs, "ttft_p50": statistics.median(d_ttft), "lat_p50": statistics.median(d_lat),
            "ttft_p90": pct(d_ttft, 90), "lat_p90": pct(d_lat, 90)}


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU of the gateway process (not its engine child)."""
    if pid is None:
        return 0.0
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def bench(gateway: str, engine: str, args, pid: int | None = None) -> dict:
    # Warm both paths (first requests compile/allocate).
    await round_(engine, "agentloop-base", 4, 8)
    await round_(gateway, "agentloop", 4, 8)
    sides = {"direct": [], "gateway": []}
    cpu = 0.0  # the gateway's own CPU during the gateway rounds
    for _ in range(args.rounds):
        sides["direct"].append(await round_(engine, "agentloop-base", args.concurrency, args.max_tokens))
        c0 = cpu_seconds(pid)
        sides["gateway"].append(await round_(gateway, "agentloop", args.concurrency, args.max_tokens))
        cpu += cpu_seconds(pid) - c0
    out = {"gateway_cpu": cpu, "gateway_tokens": sum(r["tokens"] for r in sides["gateway"])}
    for side, rounds in sides.items():
        tokens = sum(r["tokens"] for r in rounds)
        wall = sum(r["wall"] for r in rounds)
        ttft = [x for r in rounds for x in r["ttft"]]
        lat = [x for r in rounds for x in r["lat"]]
        out[side] = {"tok_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
                     "lat_p50": pct(lat, 50), "lat_p99": pct(lat, 99), "requests": len(lat)}
    if args.pairs:
        out["paired"] = await paired(gateway, engine, args.pairs, args.pair_tokens)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pairs", type=int, default=200, help="single-stream pairs for the added latency (0: skip)")
    p.add_argument("--pair-tokens", type=int, default=8, help="max_tokens of each single stream")
    p.add_argument("--gateway", help="URL of a running gateway (with --engine); default: start one")
    p.add_argument("--engine", help="URL of the vLLM server behind --gateway")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the test model: nearly free per token, so the gateway's share is largest), "
                        "'default' (the embedded SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--gateway-pid", type=int, help="pid of --gateway, to report its CPU per token")
    args = p.parse_args()
    proc, pid = None, args.gateway_pid
    if args.gateway:
        gateway, engine = args.gateway, args.engine
    else:
        from tests.conftest import start_gateway, stop_gateway
        from tests.tiny_model import ensure_tiny_model

        home = Path(tempfile.mkdtemp(prefix="agentloop-bench-"))
        if args.model == "tiny":
            model = ensure_tiny_model()
        elif args.model == "default":
            from agentloop.serve.engine.default_model import ensure_default_model

            model = ensure_default_model()
        else:
            model = Path(args.model)
        proc, gateway, engine = start_gateway(home, model)
        pid = proc.pid
    try:
        res = asyncio.run(bench(gateway, engine, args, pid))
    finally:
        if proc is not None:
            stop_gateway(proc)
    d, g = res["direct"], res["gateway"]
    print(f"model: {args.model}; load: {args.rounds} rounds x {args.concurrency} concurrent streams x {args.max_tokens} tokens, "
          f"direct and gateway alternating")
    for side in ("direct", "gateway"):
        r = res[side]
        print(f"{side:8s} {r['tok_s']:8.1f} tok/s  ttft p50 {r['ttft_p50']*1000:7.1f} ms  p99 {r['ttft_p99']*1000:7.1f} ms"
              f"  latency p50 {r['lat_p50']*1000:7.1f} ms  p99 {r['lat_p99']*1000:7.1f} ms  ({r['requests']} requests)")
    print(f"throughput ratio gateway/direct: {g['tok_s'] / d['tok_s']:.3f}")
    print(f"added ttft    p50 {1000*(g['ttft_p50']-d['ttft_p50']):+.2f} ms  p99 {1000*(g['ttft_p99']-d['ttft_p99']):+.2f} ms")
    print(f"added latency p50 {1000*(g['lat_p50']-d['lat_p50']):+.2f} ms  p99 {1000*(g['lat_p99']-d['lat_p99']):+.2f} ms")
    if pid is not None:
        print(f"gateway process CPU: {res['gateway_cpu']:.2f} s for {res['gateway_tokens']} streamed tokens "
              f"({1e6 * res['gateway_cpu'] / max(1, res['gateway_tokens']):.0f} us per token, "
              f"{1e3 * res['gateway_cpu'] / max(1, g['requests']):.2f} ms per request)")
    if "paired" in res:
        q = res["paired"]
        print(f"single streams, {q['pairs']} pairs, {args.pair_tokens} tokens each: added ttft median "
              f"{1000*q['ttft_p50']:+.2f} ms (p90 {1000*q['ttft_p90']:+.2f}), added latency median "
              f"{1000*q['lat_p50']:+.2f} ms (p90 {1000*q['lat_p90']:+.2f})")
    print(f"load average during the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
