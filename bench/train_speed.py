"""Seconds per DPO/KTO update as the number of pairs grows, on the default model on CPU.

One "update" is what a loop iteration trains: one epoch over N preference
pairs (DPO) or 2N unpaired examples (KTO), batch 2, LoRA r=8, continuing from
the zero adapter, in the same job process the loop uses (rl/job.py).

    .venv/bin/python -m bench.train_speed --pairs 16 64 256 --methods dpo kto
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

from rl.job import read_events, start_job  # noqa: E402
from rl.registry import AdapterRegistry  # noqa: E402
from serve.zero_adapter import write_zero_adapter  # noqa: E402

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


def kto_rows(n: int) -> list[dict]:
    out = []
    for r in pairs(n):
        base = {"prompt": r["prompt"], "tools": None, "chat_template_kwargs": r["chat_template_kwargs"]}
        out.append({**base, "completion": r["chosen"], "label": True})
        out.append({**base, "completion": r["rejected"], "label": False})
    return out


def run(method: str, n: int, model: str, work: Path) -> dict:
    reg_root = work / f"reg-{method}-{n}"
    write_zero_adapter(Path(model), reg_root / "v0000")
    data = work / f"{method}-{n}.jsonl"
    rows = pairs(n) if method == "dpo" else kto_rows(n)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"method": method, "registry": str(reg_root), "base_model": model, "dataset": str(data),
            "parent": "v0000", "config": {"per_device_train_batch_size": 2, "num_train_epochs": 1,
                                          "max_length": 128, "learning_rate": 5e-5}}
    t0 = time.perf_counter()
    proc = start_job(spec, log_path=work / f"{method}-{n}.log")
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
    return {"method": method, "pairs": n, "steps": steps, "wall_s": wall, "train_s": res.get("train_seconds"),
            "s_per_step": res.get("seconds_per_step")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--methods", nargs="+", default=["dpo", "kto"], choices=["dpo", "kto"])
    p.add_argument("--model", help="Model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = p.parse_args()
    if args.model is None:
        from serve.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    work = Path(tempfile.mkdtemp(prefix="agentloop-train-bench-"))
    print(f"model {args.model}; batch 2, r=8, max_length 128, one epoch; job wall time includes model load")
    print(f"{'method':6} {'pairs':>5} {'steps':>5} {'update s':>9} {'train s':>8} {'s/step':>7}")
    for method in args.methods:
        for n in args.pairs:
            r = run(method, n, args.model, work)
            print(f"{r['method']:6} {r['pairs']:>5} {r['steps']:>5} {r['wall_s']:>9.1f} "
                  f"{(r['train_s'] or 0):>8.1f} {(r['s_per_step'] or 0):>7.2f}", flush=True)


if __name__ == "__main__":
    main()
