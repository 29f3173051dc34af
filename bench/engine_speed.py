"""Engine speed: plain vLLM and agentloop on the same model and CPU, side by side in one run.

Owns the "Engine speed" benchmark (issue 34). One engine at a time, on the embedded default
model (SmolLM2-135M-Instruct) unless --model:
- **plain vLLM**: `python -m vllm.entrypoints.openai.api_server` with the engine's own best
  settings for this CPU: the dtype by rl/precision.py's rule, no LoRA, no plugins of ours;
- **agentloop before issue 34**: `AGENTLOOP_BASE_ON_WEIGHTS=false` and
  `AGENTLOOP_LORA_CPU_COMPILE=0`: every request through a LoRA adapter (v0000 the zero
  one), the engine eager as vLLM's CPU platform makes it whenever LoRA is on;
- **agentloop** (the defaults): v0000 on the bare base weights, LoRA compiled
  (serve/inside_vllm/lora_compile.py).
On each agentloop side: first with v0000 live, then with a trained version live, promoted
through the admin API: a non-zero rank-8 adapter over the default target modules (the
shape training writes; the speed does not depend on the values).
Through the gateway as users are served (`model: agentloop`, streamed). Per side: one stream,
then 8 streams at once, each `--tokens` tokens with `ignore_eos`; tokens per second of the
whole request (prefill included), the median of `--reps` rounds after a warm-up. Writes the
table to docs/benchmarks.md under "## Engine speed" (its generated block only).

    .venv/bin/python -m bench.engine_speed                      # ~15 min on 2 cores
    .venv/bin/python -m bench.engine_speed --reps 1 --tokens 32 --no-docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import write_run  # noqa: E402
from bench.gateways import gateway  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Engine speed"
STREAMS = 8


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int, i: int) -> int:
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Tell me a long story about the number {i}."}],
            "stream_options": {"include_usage": True}}
    done = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                done = usage["completion_tokens"] if usage else done
    return done


async def rate(url: str, model: str, streams: int, tokens: int) -> float:
    """Completion tokens per second over `streams` requests sent at once."""
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=streams * 2)) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(client, url, model, tokens, i) for i in range(streams)))
        wall = time.perf_counter() - t0
    if min(done) != tokens:
        raise RuntimeError(f"{url}: asked {tokens} tokens a request, got {done}")
    return sum(done) / wall


def measure(url: str, model: str, reps: int, tokens: int) -> dict[str, float]:
    asyncio.run(rate(url, model, 2, 16))  # warm-up: first-request and batch-shape costs
    single = [asyncio.run(rate(url, model, 1, tokens)) for _ in range(reps)]
    many = [asyncio.run(rate(url, model, STREAMS, tokens)) for _ in range(reps)]
    return {"single": statistics.median(single), "many": statistics.median(many),
            "single_all": single, "many_all": many}


@contextmanager
def plain_vllm(model_dir: Path, dtype: str):
    from agentloop.serve.settings import Settings
    from agentloop.templates.registry import get_template
    from tests.conftest import free_port

    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "plain", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--chat-template", str(get_template("chatml-tools").path), "--disable-uvicorn-access-log",
            "--kv-cache-memory-bytes", str(int(Settings.model_fields["kvcache_space_gib"].default * 2**30))]
    env = {**os.environ, "VLLM_PLUGINS": "none", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log = open(Path(tempfile.mkdtemp(prefix="bench-plain-")) / "vllm.log", "wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"plain vLLM exited ({proc.returncode}); see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"plain vLLM not ready; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


def promote_trained_version(url: str, home: Path, model_dir: Path) -> str:
    """Commit a non-zero rank-8 adapter (the zero adapter's shapes, random B) and promote it."""
    from agentloop.rl.registry import AdapterRegistry
    from tests.conftest import ADMIN_KEY, noisy_adapter

    (base,) = home.glob("adapters/*/v0000")
    reg = AdapterRegistry(base.parent)
    src = noisy_adapter(base, Path(tempfile.mkdtemp(prefix="bench-adapter-")) / "a", seed=7, scale=0.02)
    m = reg.commit(src, parent="v0000", base_model=str(model_dir), method="bench")
    r = httpx.post(f"{url}/admin/promote", json={"version": m.version}, timeout=300,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    r.raise_for_status()
    return m.version


def cpu_line() -> str:
    from agentloop.rl.precision import NATIVE_BF16_FLAGS, cpu_flags

    info = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = cpu_flags(info)
    shown = sorted(f for f in flags if f in NATIVE_BF16_FLAGS | {"avx2", "avx512f", "amx_tile"})
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the embedded default model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    started = time.monotonic()
    from agentloop.rl.precision import choose

    model_dir = Path(args.model) if args.model else Path(subprocess.run(
        [sys.executable, "-m", "agentloop.serve.engine.default_model"], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1])
    precision = choose("auto")
    results: dict[str, dict] = {}

    def report(side: str, r: dict) -> None:
        results[side] = r
        print(f"{side:45s} single {r['single']:6.1f} tok/s   {STREAMS} streams {r['many']:6.1f} tok/s   "
              f"(all: {[round(x, 1) for x in r['single_all']]} / {[round(x, 1) for x in r['many_all']]})",
              flush=True)

    with plain_vllm(model_dir, precision.vllm_dtype) as url:
        report("plain vLLM", measure(url, "plain", args.reps, args.tokens))
    sides = {"before": {"AGENTLOOP_BASE_ON_WEIGHTS": "false", "AGENTLOOP_LORA_CPU_COMPILE": "0"}, "now": {}}
    for side, env in sides.items():
        label = "agentloop before issue 34" if side == "before" else "agentloop"
        home = Path(tempfile.mkdtemp(prefix="bench-speed-"))
        with gateway(model_dir, env=env, home=home) as url:
            report(f"{label}, v0000 live", measure(url, "agentloop", args.reps, args.tokens))
            promote_trained_version(url, home, model_dir)
            report(f"{label}, a trained version live", measure(url, "agentloop", args.reps, args.tokens))

    plain = results["plain vLLM"]
    lines = [f"| server | single stream | {STREAMS} streams, aggregate |", "|---|---|---|"]
    for side, r in results.items():
        ratio = "" if side == "plain vLLM" else (f" ({r['single'] / plain['single']:.2f}×)", f" ({r['many'] / plain['many']:.2f}×)")
        lines.append(f"| {side} | {r['single']:.1f} tok/s{ratio[0] if ratio else ''} | "
                     f"{r['many']:.1f} tok/s{ratio[1] if ratio else ''} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_docs:
        setup = (f"CPU: {cpu_line()}. Model: {model_dir.name}, dtype {precision.vllm_dtype} ({precision.reason}). "
                 f"{args.tokens} generated tokens a request (`ignore_eos`), streamed, greedy; tokens per second "
                 f"of whole requests, the median of {args.reps} rounds after a warm-up; ratios to plain vLLM.")
        write_run(DOCS, SECTION, "bench.engine_speed", setup, table, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
