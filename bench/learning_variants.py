"""Side by side: several DPO job settings trained on one stored feedback set, each scored on BFCL.

Owns: the offline half of the learning benchmark. `bench.bfcl_learning` leaves its agentloop
home behind (it prints the path); this script builds the loop's DPO dataset from that home's
store (same split and positives as the loop), trains one adapter per variant with `train_dpo`
(continuing from the home's zero adapter, as the loop's first iteration does, unless the variant
says `"fresh": true`), then starts one engine and scores every adapter on the same held-out
questions that `bench.bfcl_learning` used (same seed, held-out slice first). Because every
variant sees the same feedback and the same questions in one run, the differences between them
are the settings' and not the day's machine or a new teaching pass.

A variant is a JSON object of `DPOJobConfig` fields plus three of this script's own:
`"rows"` ("positives": the loop's set, the default; "pairs": without positive-only rows),
`"fresh"` (a new LoRA from the base instead of the zero adapter) and `"base"` (no training:
score the zero adapter, the model before the iteration).

Invariant: read-only on the home (the store is only read, adapters go to a temporary folder);
the engine it starts is stopped, also on error.

    .venv/bin/python -m bench.learning_variants /tmp/agentloop-bfcl-learn-XXXX --held-out 50 \\
        --variants '[{"base": true}, {}, {"sft_weight": 3.0}]'
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bfcl import DATA, _run, run_side, start_agentloop  # noqa: E402
from bench.bfcl_ast import load_category  # noqa: E402

OWN_KEYS = ("rows", "fresh", "base")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("home", type=Path, help="an agentloop home left by bench.bfcl_learning")
    p.add_argument("--variants", type=json.loads, required=True, help="JSON list of variants (see the docstring)")
    p.add_argument("--held-out", type=int, default=50, help="held-out questions (as given to bench.bfcl_learning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--eval-percent", type=int, default=20, help="the loop's gate share (rows it never trains on)")
    p.add_argument("--template", default="chatml-tools")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--dump", type=Path, help="write every variant's graded answers as JSON")
    args = p.parse_args()

    from agentloop.rl.datasets import DatasetConfig, build_dataset
    from agentloop.rl.dpo import DPOJobConfig, train_dpo
    from agentloop.serve.engine.default_model import ensure_default_model
    from agentloop.serve.store.db import Store
    from tests.conftest import stop_gateway

    store = Store(f"sqlite:///{args.home / 'agentloop.db'}")
    rows = {name: build_dataset(store, DatasetConfig(kind="dpo", eval_percent=args.eval_percent,
                                                     positives=name == "positives")).train
            for name in ("positives", "pairs")}
    print(f"training rows: {len(rows['positives'])} with positives, {len(rows['pairs'])} pairs only", flush=True)
    zero = next((args.home / "adapters").glob("*/v0000"))
    model = ensure_default_model()
    cases = load_category(args.data, "simple")
    random.Random(args.seed).shuffle(cases)
    held = cases[: args.held_out]

    out = Path(tempfile.mkdtemp(prefix="agentloop-variants-"))
    adapters = []
    for i, variant in enumerate(args.variants):
        job = {k: v for k, v in variant.items() if k not in OWN_KEYS}
        if variant.get("base"):
            adapters.append((zero, None))
            continue
        cfg = DPOJobConfig(base_model=str(model), output_dir=str(out / f"v{i}"), template=args.template,
                           init_adapter=None if variant.get("fresh") else str(zero),
                           **{"max_length": 640, "prompt_gradient": False, **job})
        data = rows[variant.get("rows", "positives")]
        t0 = time.perf_counter()
        result = train_dpo(cfg, data)
        seconds = time.perf_counter() - t0
        print(f"variant {i} {json.dumps(variant)}: {len(data)} rows, {result.steps} steps in {seconds:.0f} s", flush=True)
        adapters.append((out / f"v{i}", seconds))

    proc, url = start_agentloop(Path(tempfile.mkdtemp(prefix="agentloop-variants-home-")), model)
    graded = {}
    try:
        engine = httpx.get(f"{url}/health").json()["engines"][0]["url"]
        for i, (path, _) in enumerate(adapters):
            r = httpx.post(f"{engine}/v1/load_lora_adapter", json={"lora_name": f"variant{i}", "lora_path": str(path)},
                           timeout=120)
            r.raise_for_status()
            graded[i] = _run(run_side(engine, f"variant{i}", held, ["required"], args.max_tokens, 2))
    finally:
        stop_gateway(proc)
    if args.dump:
        args.dump.write_text(json.dumps(graded, indent=1, default=str))
    print(f"\nheld out {len(held)} BFCL simple questions (seed {args.seed}), tool_choice=required")
    for i, variant in enumerate(args.variants):
        ok = sum(r["ast"] for r in graded[i])
        secs = adapters[i][1]
        print(f"  {json.dumps(variant)}: {ok}/{len(graded[i])} ({100 * ok / len(graded[i]):.1f}%)"
              + (f", trained in {secs:.0f} s" if secs is not None else ""))


if __name__ == "__main__":
    main()
