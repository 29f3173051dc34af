"""LoRA prefill cost on the CPU engine: vLLM's own LoRA ops vs agentloop's (serve/inside_vllm/lora_cpu.py).

Starts a gateway (supervising one vLLM CPU server) on the default model twice in
one run -- once with AGENTLOOP_LORA_CPU_KERNELS=0 (vLLM's reference ops), once
with ours -- and, on each, alternates long-prompt requests (a new prompt each
time, so no prefix cache helps; max_tokens 1, so the time is the prefill) to the
bare base model and to the zero adapter v0000 (loaded with AGENTLOOP_BASE_ON_WEIGHTS=false, as
the alias routed through it before the base ran on the bare weights).
Prints the median seconds per request and the LoRA/base ratio for both.

    .venv/bin/python -m bench.lora_prefill --words 1400 --reps 4
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "apple river stone cloud music window garden silver paper light".split()


def measure(model_dir: Path, kernels: bool, words: int, reps: int) -> dict[str, list[float]]:
    from tests.conftest import start_gateway, stop_gateway

    old = os.environ.get("AGENTLOOP_LORA_CPU_KERNELS")
    os.environ["AGENTLOOP_LORA_CPU_KERNELS"] = "1" if kernels else "0"
    os.environ["AGENTLOOP_BASE_ON_WEIGHTS"] = "false"  # so the zero adapter is loaded to compare with
    try:
        proc, _, engine = start_gateway(Path(tempfile.mkdtemp(prefix="agentloop-bench-")), model_dir)
    finally:
        os.environ.pop("AGENTLOOP_BASE_ON_WEIGHTS")
        if old is None:
            os.environ.pop("AGENTLOOP_LORA_CPU_KERNELS")
        else:
            os.environ["AGENTLOOP_LORA_CPU_KERNELS"] = old
    rng = random.Random(0)
    out: dict[str, list[float]] = {"base": [], "lora": [], "tokens": []}
    try:
        base = next(m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"] if not m.get("parent"))
        for _ in range(reps):
            for side, name in (("base", base), ("lora", "agentloop@v0000")):
                text = f"{rng.random()} " + " ".join(rng.choice(WORDS) for _ in range(words))
                body = {"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
                t0 = time.perf_counter()
                r = httpx.post(f"{engine}/v1/chat/completions", json=body, timeout=900)
                r.raise_for_status()
                out[side].append(time.perf_counter() - t0)
                out["tokens"].append(r.json()["usage"]["prompt_tokens"])
    finally:
        stop_gateway(proc)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--words", type=int, default=1400, help="words per prompt (about one token each)")
    p.add_argument("--reps", type=int, default=4, help="requests per side")
    p.add_argument("--model", help="model folder (default: the embedded default model)")
    args = p.parse_args()
    from agentloop.serve.engine.default_model import ensure_default_model

    model_dir = Path(args.model) if args.model else ensure_default_model()
    res = {k: measure(model_dir, k, args.words, args.reps) for k in (False, True)}
    print(f"prompt ~{int(statistics.median(res[True]['tokens']))} tokens, max_tokens 1, {args.reps} requests per side, "
          f"load {os.getloadavg()[0]:.2f}")
    for kernels, r in res.items():
        b, lo = statistics.median(r["base"]), statistics.median(r["lora"])
        label = "agentloop LoRA ops" if kernels else "vLLM LoRA ops    "
        print(f"{label}  base {b:6.2f} s   zero adapter {lo:6.2f} s   LoRA/base {lo / b:5.2f}x")
    speed = statistics.median(res[False]["lora"]) / statistics.median(res[True]["lora"])
    print(f"LoRA prefill speed-up, agentloop vs vLLM ops: {speed:.2f}x")


if __name__ == "__main__":
    main()
