"""Seconds per DPO/KTO update as the number of pairs grows, on the default model on CPU.

One "update" is what a loop iteration trains: one epoch over N preference
pairs (DPO) or 2N unpaired examples (KTO), batch 2, LoRA r=8, continuing from
the zero adapter, in the same job process the loop uses (rl/job.py).

Rows: `short` (one-sentence prompts, ~60 tokens a sequence) or `bfcl` (BFCL `simple`
questions with their function docs as tools, ~300-600 prompt tokens; chosen = the
ground-truth call, rejected = the same call with its first argument changed -- the shape of
a tool-call correction). DPO can be run with each forward (`--dpo-forward`): `trl` (TRL's two
full sequences per pair), `shared` (rl/shared_prefix.py, exact), `shared-nograd` (shared,
no gradient through the prompt), side by side in one run.

    .venv/bin/python -m bench.train_speed --pairs 16 64 256 --methods dpo kto
    .venv/bin/python -m bench.train_speed --rows bfcl --pairs 64 --methods dpo --dpo-forward trl shared shared-nograd
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentloop.rl.job import read_events, start_job  # noqa: E402
from agentloop.rl.registry import AdapterRegistry  # noqa: E402
from agentloop.rl.zero_adapter import write_zero_adapter  # noqa: E402

TOPICS = ["the sea", "a cat", "rain", "coffee", "a train", "the moon", "bread", "a garden"]


def pairs(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        prompt = [{"role": "user", "content": f"Write one sentence about {t} (#{i})."}]
        rows.append({"prompt": prompt, "tools": None, "chat_template_kwargs": {"enable_thinking": False},
                     "chosen": [{"role": "assistant", "content": f"Certainly! Here is a sentence about {t}."}],
                     "rejected": [{"role": "assistant", "content": f"No. I will not write about {t}."}]})
    return rows


def bfcl_pairs(n: int) -> list[dict]:
    """n tool-call corrections built from BFCL `simple` (cycled if n exceeds the category)."""
    from bench.bfcl import DATA, case_request
    from bench.bfcl_ast import load_category
    from bench.bfcl_learning import ground_truth_call

    cases = load_category(DATA, "simple")
    rows = []
    for i in range(n):
        case = cases[i % len(cases)]
        req = case_request(case, "required", 128)
        good = ground_truth_call(case)
        args = json.loads(good["function"]["arguments"])
        for key, value in list(args.items())[:1]:  # a wrong value for the first argument
            args[key] = value + 1 if isinstance(value, (int, float)) and not isinstance(value, bool) else "unknown"
        bad = {**good, "function": {**good["function"], "arguments": json.dumps(args)}}
        rows.append({"prompt": req["messages"], "tools": req["tools"], "chat_template_kwargs": {},
                     "chosen": [{"role": "assistant", "content": None, "tool_calls": [good]}],
                     "rejected": [{"role": "assistant", "content": None, "tool_calls": [bad]}]})
    return rows


FORWARDS = {"trl": {"share_prompt": False}, "shared": {"share_prompt": True},
            "shared-nograd": {"share_prompt": True, "prompt_gradient": False}}


def kto_rows(n: int, kind: str = "short") -> list[dict]:
    out = []
    for r in (pairs(n) if kind == "short" else bfcl_pairs(n)):
        base = {"prompt": r["prompt"], "tools": r["tools"], "chat_template_kwargs": r["chat_template_kwargs"]}
        out.append({**base, "completion": r["chosen"], "label": True})
        out.append({**base, "completion": r["rejected"], "label": False})
    return out


def run(method: str, n: int, model: str, work: Path, kind: str = "short", forward: str = "shared",
        job: dict | None = None) -> dict:
    tag = f"{method}-{n}-{kind}-{forward}-{len(list(work.iterdir()))}"
    reg_root = work / f"reg-{tag}"
    write_zero_adapter(Path(model), reg_root / "v0000")
    data = work / f"{tag}.jsonl"
    if method == "dpo":
        rows = pairs(n) if kind == "short" else bfcl_pairs(n)
    else:
        rows = kto_rows(n, kind)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"per_device_train_batch_size": 2, "num_train_epochs": 1,
              "max_length": 128 if kind == "short" else 1024, "learning_rate": 5e-5}
    if method == "dpo":
        config.update(FORWARDS[forward])
    config.update(job or {})
    spec = {"method": method, "registry": str(reg_root), "base_model": model, "dataset": str(data),
            "parent": "v0000", "config": config}
    t0 = time.perf_counter()
    proc = start_job(spec, log_path=work / f"{tag}.log")
    steps, done = 0, {}
    for ev in read_events(proc):
        if ev.get("event") == "step":
            steps = ev["step"]
        elif ev.get("event") in ("done", "failed"):
            done = ev
    wall = time.perf_counter() - t0
    if done.get("event") != "done":
        raise SystemExit(f"{method} {n}: {done.get('error')}")
    res = done["result"]
    assert AdapterRegistry(reg_root).get(done["version"]).status == "candidate"
    return {"method": (method if method == "kto" else f"dpo/{forward}") + (f" {json.dumps(job)}" if job else ""),
            "pairs": n, "steps": steps, "wall_s": wall, "train_s": res.get("train_seconds"),
            "s_per_step": res.get("seconds_per_step")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--methods", nargs="+", default=["dpo", "kto"], choices=["dpo", "kto"])
    p.add_argument("--model", help="Model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rows", choices=["short", "bfcl"], default="short", help="short prompts or BFCL tool prompts")
    p.add_argument("--dpo-forward", nargs="+", default=["shared"], choices=list(FORWARDS),
                   help="DPO forward(s) to time, each on the same rows")
    p.add_argument("--job", type=json.loads, nargs="+", default=[{}],
                   help='job settings to time side by side, e.g. \'{"cpu_base_weights": "fp32"}\' \'{"cpu_base_weights": "bf16"}\'')
    args = p.parse_args()
    if args.model is None:
        from agentloop.serve.engine.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    work = Path(tempfile.mkdtemp(prefix="agentloop-train-bench-"))
    print(f"model {args.model}; rows {args.rows}; batch 2, r=8, one epoch; job wall time includes model load")
    print(f"{'method':18} {'pairs':>5} {'steps':>5} {'update s':>9} {'train s':>8} {'s/step':>7}")
    for method in args.methods:
        for n in args.pairs:
            for forward, job in ((f, j) for f in (args.dpo_forward if method == "dpo" else ["-"]) for j in args.job):
                r = run(method, n, args.model, work, args.rows, forward, job)
                print(f"{r['method']:18} {r['pairs']:>5} {r['steps']:>5} {r['wall_s']:>9.1f} "
                      f"{(r['train_s'] or 0):>8.1f} {(r['s_per_step'] or 0):>7.2f}", flush=True)


if __name__ == "__main__":
    main()
