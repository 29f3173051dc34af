"""The gate a candidate adapter must pass before it may serve users.

Two checks, both against the version that is live now:
1. Preference accuracy on held-out feedback pairs: the share of pairs where
   the adapter's implicit reward margin is positive, i.e.
   [log p(chosen) - log p(rejected)] under the adapter minus the same under
   the base model (DPO's implicit reward with the base as reference). The base
   itself scores 0 by definition. Callers weigh equally: `accuracy` is the mean
   of each caller's (API key's) own share, so a key that floods the held-out
   set still counts as one voice (`pair_accuracy` is the plain share). The
   candidate must reach `min_accuracy` (most voices agree with it) and beat
   the live version by `min_accuracy_gain`.
2. Tool-call validity on a fixed regression set, through the real engine: the
   share of forced tool calls that name an offered tool and whose arguments
   validate against its schema. It must not drop by more than `max_validity_drop`.
3. Grades on held-out graded prompts (conversations with reference feedback in the
   held-out split): each version answers each greedily, through the gateway's chat
   path, and the deployment's graders score the answers against the reference
   (`graded_check`). The candidate's mean must not fall below the live version's by
   more than `max_grade_drop`. With too few preference pairs, this check alone
   decides (reference feedback on one answer makes a graded prompt, not a pair);
   with neither enough pairs nor enough graded prompts, the candidate is refused.

The preference check needs torch, so it never runs in the gateway's event loop.
The loop has the training job run it (`score_loaded` on the model the job
already holds, right after training), which saves a process start and a model
load per iteration; `python -m agentloop.rl.gate <spec.json>` (`preference_accuracy`)
scores saved adapters in a process of its own. `tool_validity` only needs a
chat callable (the gateway passes its engine pool).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGRESSION_SET = Path(__file__).with_name("regression_tools.json")


@dataclass
class GateConfig:
    min_accuracy_gain: float = field(default=0.1, metadata={
        "help": "Candidate preference accuracy must exceed the live version's by at least this much (0..1)."})
    min_accuracy: float = field(default=0.5, metadata={
        "help": "Candidate preference accuracy, callers weighed equally, must be at least this (0..1): a "
                "candidate most held-out voices disagree with is refused, however one key voted."})
    min_eval_pairs: int = field(default=2, metadata={
        "help": "Fewest held-out preference pairs for the preference check to count; fewer rejects the candidate."})
    max_validity_drop: float = field(default=0.0, metadata={
        "help": "How much tool-call validity (0..1) may drop against the live version."})
    max_grade_drop: float = field(default=0.0, metadata={
        "help": "How much the candidate's mean grade (0..1) on the held-out graded prompts may fall below the "
                "live version's."})
    min_graded_prompts: int = field(default=2, metadata={
        "help": "Fewest held-out graded prompts (both versions' answers scored) for the grade check to count."})
    max_graded_prompts: int = field(default=32, metadata={
        "help": "At most this many held-out graded prompts answered by each version (newest feedback first)."})

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_accuracy_gain <= 1.0:
            raise ValueError("min_accuracy_gain must be in [-1, 1]")
        if self.min_eval_pairs < 1:
            raise ValueError("min_eval_pairs must be >= 1")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError("min_accuracy must be in [0, 1]")
        if not 0.0 <= self.max_validity_drop <= 1.0:
            raise ValueError("max_validity_drop must be in [0, 1]")
        if not 0.0 <= self.max_grade_drop <= 1.0:
            raise ValueError("max_grade_drop must be in [0, 1]")
        if self.min_graded_prompts < 1 or self.max_graded_prompts < 0:
            raise ValueError("min_graded_prompts must be >= 1 and max_graded_prompts >= 0")


def summarize(margins: list[float], callers: list[str]) -> dict:
    """Accuracy numbers for one adapter's margins on rows from `callers` (one per row).

    `accuracy` averages per-caller accuracies, so each caller is one voice however
    many pairs it has in the held-out set; `pair_accuracy` counts pairs."""
    by_caller: dict[str, list[float]] = {}
    for m, c in zip(margins, callers):
        by_caller.setdefault(c, []).append(m)
    per = [sum(x > 0 for x in ms) / len(ms) for ms in by_caller.values()]
    n = len(margins)
    return {"accuracy": sum(per) / len(per) if per else 0.0,
            "pair_accuracy": sum(m > 0 for m in margins) / n if n else 0.0,
            "mean_margin": sum(margins) / n if n else 0.0, "n": n, "callers": len(by_caller)}


def score_loaded(model, tokenizer, template: str, rows: list[dict], adapters: dict[str, str | None]) -> dict:
    """{name: summarize(...)} for each adapter, scored on `model`, a PeftModel over the base.

    Each value is the name of an adapter already in `model`, a folder to load into it, or None
    (the base itself: margins 0 by definition). Margins are taken against the base, which is
    the same model with its adapters disabled. The active adapter is restored afterwards."""
    from agentloop.rl.logprobs import preference_margins

    callers = [str(r.get("caller") or "") for r in rows]
    was_training, active = model.training, model.active_adapter
    model.eval()
    try:
        with model.disable_adapter():
            base_margins = preference_margins(model, tokenizer, template, rows)
        out: dict[str, dict] = {}
        for name, source in adapters.items():
            if source is None:
                margins = [0.0] * len(rows)
            else:
                loaded = source
                if source not in model.peft_config:
                    loaded = f"gate-{name}"
                    model.load_adapter(source, adapter_name=loaded, is_trainable=False)
                model.set_adapter(loaded)
                margins = [m - b for m, b in zip(preference_margins(model, tokenizer, template, rows), base_margins)]
            out[name] = summarize(margins, callers)
    finally:
        model.set_adapter(active)
        model.train(was_training)
    return out


def preference_accuracy(base_model: str, template: str, rows: list[dict], adapters: dict[str, str | None]) -> dict:
    """{name: summarize(...)} for each adapter folder (None = the base), loading the base in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from agentloop.rl.common import load_tokenizer

    paths = [p for p in adapters.values() if p is not None]
    if not paths:
        zero = summarize([0.0] * len(rows), [str(r.get("caller") or "") for r in rows])
        return {name: dict(zero) for name in adapters}
    tok = load_tokenizer(base_model, template)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="gate-first", is_trainable=False)
    return score_loaded(model, tok, template, rows,
                        {n: ("gate-first" if p == paths[0] else p) for n, p in adapters.items()})


def _valid(call: dict, tools: list[dict]) -> bool:
    import jsonschema

    by_name = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    fn = call.get("function") or {}
    if fn.get("name") not in by_name:
        return False
    try:
        args = json.loads(fn.get("arguments") or "")
        jsonschema.validate(args, by_name[fn["name"]])
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return isinstance(args, dict)


def load_regression_set(path: Path | None = None) -> list[dict]:
    return json.loads((path or REGRESSION_SET).read_text())


async def tool_validity(chat: Callable[[dict], Awaitable[dict]], model: str, cases: list[dict],
                        max_tokens: int = 96) -> dict:
    """Share of forced tool calls that are valid, for one served adapter name. The cases are
    sent together: the engine batches them (they are independent greedy requests)."""

    async def one(case: dict) -> bool:
        body = {"model": model, "messages": case["messages"], "tools": case["tools"], "tool_choice": "required",
                "temperature": 0, "max_tokens": max_tokens}
        resp = await chat(body)
        calls = ((resp.get("choices") or [{}])[0].get("message") or {}).get("tool_calls") or []
        return bool(calls) and all(_valid(c, case["tools"]) for c in calls)

    valid = sum(await asyncio.gather(*(one(c) for c in cases)))
    return {"validity": valid / len(cases) if cases else 1.0, "n": len(cases)}


async def graded_check(prompts: list, answer: Callable[[dict, str], Awaitable[dict]], graders,
                       versions: dict[str, str], max_tokens: int = 256) -> dict:
    """Mean grade of each version's greedy answer to the held-out graded `prompts` (rl/sampling.py
    Prompt: request and reference): {name: {"mean", "n"}, "n": prompts both versions were scored
    on, "unscored": prompts left out}. `answer(body, version)` is LoopHooks.sample; an answer that
    fails or that no grader scores leaves its prompt out for both versions, never a 0."""
    from agentloop.rl.graded import score_candidates
    from agentloop.rl.sampling import SamplingConfig, sampling_body

    greedy = SamplingConfig(k=1, temperature=0.0, max_tokens=max_tokens)

    async def one(p, version: str) -> float | None:
        try:
            resp = await answer(sampling_body(p.request, greedy), version)
            msg = (resp.get("choices") or [{}])[0].get("message")
        except Exception:  # noqa: BLE001 - an unanswered prompt is left out, for both versions
            return None
        if not isinstance(msg, dict):
            return None
        return (await asyncio.to_thread(score_candidates, graders, p.request, [msg], p.reference))[0].score

    names = list(versions)
    scores = await asyncio.gather(*(one(p, versions[n]) for p in prompts for n in names))
    rows = [scores[i:i + len(names)] for i in range(0, len(scores), len(names))]
    both = [r for r in rows if None not in r]
    out: dict[str, Any] = {n: {"mean": sum(r[i] for r in both) / len(both) if both else 0.0, "n": len(both)}
                           for i, n in enumerate(names)}
    out.update(n=len(both), unscored=len(rows) - len(both))
    return out


def decide(cfg: GateConfig, pref: dict, tools: dict, grades: dict | None = None) -> tuple[bool, str]:
    cand, live = pref["candidate"], pref["live"]
    graded = grades is not None and grades["n"] >= cfg.min_graded_prompts
    notes = []
    if cand["n"] < cfg.min_eval_pairs:
        if not graded:
            more = f" and {grades['n']} held-out graded prompts (< {cfg.min_graded_prompts})" if grades else ""
            return False, f"only {cand['n']} held-out preference pairs (< {cfg.min_eval_pairs}){more}"
        notes.append(f"{cand['n']} held-out preference pairs: the grades decide")
    elif cand["accuracy"] < cfg.min_accuracy:
        voices = f" over {cand['callers']} callers" if cand.get("callers") else ""
        return False, (f"preference accuracy {cand['accuracy']:.2f}{voices} (each caller one voice) is below "
                       f"{cfg.min_accuracy:.2f}: most held-out feedback prefers other answers")
    elif cand["accuracy"] - live["accuracy"] < cfg.min_accuracy_gain:
        return False, (f"preference accuracy {cand['accuracy']:.2f} does not beat live {live['accuracy']:.2f} "
                       f"by {cfg.min_accuracy_gain:.2f}")
    else:
        notes.append(f"preference accuracy {cand['accuracy']:.2f} vs live {live['accuracy']:.2f}")
    drop = tools["live"]["validity"] - tools["candidate"]["validity"]
    if drop > cfg.max_validity_drop:
        return False, (f"tool-call validity fell from {tools['live']['validity']:.2f} to "
                       f"{tools['candidate']['validity']:.2f}")
    notes.append(f"tool-call validity {tools['candidate']['validity']:.2f} vs {tools['live']['validity']:.2f}")
    if graded:
        c, lv = grades["candidate"]["mean"], grades["live"]["mean"]
        if lv - c > cfg.max_grade_drop:
            return False, f"held-out grades fell from {lv:.2f} to {c:.2f} over {grades['n']} graded prompts"
        notes.append(f"held-out grades {c:.2f} vs live {lv:.2f} over {grades['n']} prompts")
    return True, "; ".join(notes)


def main(argv: list[str] | None = None) -> int:
    """`python -m agentloop.rl.gate spec.json`: spec {base_model, template, rows (JSONL path), adapters}."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines() if line.strip()]
    result = preference_accuracy(spec["base_model"], spec.get("template", "chatml-tools"), rows, spec["adapters"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
