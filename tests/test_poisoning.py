"""Poisoning defence: one hostile key floods inverted feedback next to a few honest keys.

The feedback goes in through the real HTTP API (keys mode, a scripted fake
engine in process, so the answers are exactly the ones rated); then one real
loop iteration (rl/loop.py: dataset builder, DPO job in its own process on the
tiny model, the preference gate in its own process) runs on that store. The
serving side of the iteration (load, chat, promote) is a recording stub: the
live version is whatever it was told to promote, and it must never be asked.

- hostile key marked untrusted: its feedback is stored (every post got a 200)
  but is in no training set and no held-out set, and what is left is too little
  to train on: the loop refuses, nothing is trained, the live version stays;
- hostile key still trusted: the dataset caps bound what it gives to training
  and held-out alike, and the gate, where each caller is one voice, rejects
  the candidate the flood trained; the live version stays.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agentloop.rl.datasets import DatasetConfig, build_dataset
from agentloop.rl.rows import bucket as _bucket
from agentloop.rl.gate import GateConfig, decide, summarize
from agentloop.rl.loop import Iteration, LoopConfig
from agentloop.rl.schema import conversation_hash
from agentloop.serve.store.db import Store
from tests.test_gateway_unit import FakeEngine
from tests.test_keys import add_key, bearer, db_url, make_app

GOOD = "Certainly! Tell me what you need."
BAD = "No. Figure it out yourself."
HONEST_KEYS = ("honest-1", "honest-2", "honest-3")
FLOOD = 40  # inverted feedback items from the hostile key (each on its own prompt: dedupe cannot fold them)


class ScriptedEngine(FakeEngine):
    """Answers every request with `answer`, which the test sets before asking."""

    answer = GOOD

    async def chat(self, body):
        self.bodies.append(body)
        yield {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": body["model"],
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": self.answer}}],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def held_out(prompt: str, percent: int = 20) -> bool:
    """Whether the loop's split (by conversation hash, rl/datasets.py) holds this prompt out."""
    return _bucket(conversation_hash({"messages": [{"role": "user", "content": prompt}]}), "") < percent


def honest_prompts(key_index: int) -> list[str]:
    """Four prompts for one honest key, two of them in the held-out split: each honest key
    gets a voice in the gate (a key with none in it has no voice to lose)."""
    out, wanted = [], {True: 2, False: 2}
    n = 0
    while any(wanted.values()):
        p = f"Could you check invoice {key_index * 1000 + n} for me?"
        n += 1
        if wanted[held_out(p)]:
            wanted[held_out(p)] -= 1
            out.append(p)
    return out


class Feeder:
    """Asks through the API with one key and rates the answers, as a client would."""

    def __init__(self, c: TestClient, eng: ScriptedEngine, raw: str):
        self.c, self.eng, self.h = c, eng, bearer(raw)
        self.acked = 0

    def ask(self, prompt: str, answer: str) -> str:
        self.eng.answer = answer
        r = self.c.post("/v1/chat/completions", headers=self.h,
                        json={"model": "agentloop", "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def feedback(self, body: dict) -> None:
        r = self.c.post("/v1/feedback", json=body, headers=self.h)
        assert r.status_code == 200, r.text
        self.acked += 1

    def prefer(self, prompt: str, chosen: str, rejected: str, *, pairwise: bool) -> None:
        if pairwise:  # a regenerate: two answers to one conversation, pick one
            rid, cid = self.ask(prompt, rejected), self.ask(prompt, chosen)
            self.feedback({"type": "pairwise", "chosen_id": cid, "rejected_id": rid})
        else:
            rid = self.ask(prompt, rejected)
            self.feedback({"type": "correction", "completion_id": rid,
                           "correction": {"role": "assistant", "content": chosen}})


def populate(home: Path, *, hostile_untrusted: bool, honest_keys=HONEST_KEYS) -> dict:
    """Keys, completions and feedback through the API; returns the keys' caller ids and counts."""
    hostile, raw_hostile = add_key(home, "hostile", trusted=not hostile_untrusted)
    honest = [add_key(home, name) for name in honest_keys]
    eng = ScriptedEngine()
    with TestClient(make_app(home, eng)) as c:
        for i, (_, raw) in enumerate(honest):
            f = Feeder(c, eng, raw)
            for j, p in enumerate(honest_prompts(i)):
                f.prefer(p, GOOD, BAD, pairwise=j % 2 == 0)
        flood = Feeder(c, eng, raw_hostile)
        for n in range(FLOOD):  # inverted: the rude answer over the helpful one
            flood.prefer(f"Could you check order {n} for me?", BAD, GOOD, pairwise=n % 2 == 0)
        c.app.state.gw.writer.flush()
    return {"hostile": hostile["caller"], "honest": [k["caller"] for k, _ in honest], "flood_acked": flood.acked}


class Hooks:
    """The serving side of an iteration, recorded. The tool-call check sees no calls from
    either version (validity 0 = 0): only the preference gate decides here."""

    def __init__(self):
        self.live = "v0000"
        self.promoted: list[str] = []
        self.loaded: list[str] = []
        self.samples: list[str] | dict[str, list[str]] = []  # what sampling answers (none: no choices)
        self.sampled: list[tuple[dict, str]] = []

    def live_version(self) -> str:
        return self.live

    async def load_candidate(self, version: str) -> str:
        self.loaded.append(version)
        return f"agentloop@{version}"

    async def unload(self, name: str) -> None:
        pass

    async def chat(self, body: dict) -> dict:
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "no tool today"}}]}

    async def sample(self, body: dict, version: str) -> dict:
        """A version's answers (on-policy sampling, the gate's graded prompts): `samples`, or
        `samples[version]` when it is a dict, cycled to the n asked."""
        self.sampled.append((body, version))
        said = self.samples.get(version, []) if isinstance(self.samples, dict) else self.samples
        answers = [said[i % len(said)] for i in range(body["n"])] if said else []
        return {"choices": [{"index": i, "message": {"role": "assistant", "content": a}} for i, a in enumerate(answers)]}

    async def promote(self, version: str, reason: str) -> None:
        self.promoted.append(version)
        self.live = version


def iterate(home: Path, tiny_model: Path | None, params: dict, setup=None) -> tuple[dict, Hooks, object]:
    from agentloop.rl.registry import AdapterRegistry
    from agentloop.rl.zero_adapter import write_zero_adapter

    registry = AdapterRegistry(home / "adapters" / "tiny")
    if tiny_model is not None:
        write_zero_adapter(tiny_model, registry.root / "v0000")
    hooks = Hooks()
    if setup is not None:
        setup(hooks)  # e.g. what the live version answers when sampled
    with Store(db_url(home)) as store:
        run = store.create_run(method="dpo", trigger="admin", promote=True, params=params)
        it = Iteration(store, registry, base_model=str(tiny_model), template="chatml-tools", hooks=hooks,
                       config=LoopConfig.from_params(params), work_dir=home / "runs")
        done = asyncio.run(it.run(run))
        done["metrics"] = store.run_metrics(run["id"])
    return done, hooks, registry


def split_callers(home: Path, run: dict) -> dict[str, list[str]]:
    """Callers of the rows the iteration wrote: what it trained on and what it held out."""
    work = home / "runs" / run["id"]
    # DPO gates on its own held-out split; KTO builds separate DPO pairs for the gate (gate/).
    gate = work / "gate" / "eval.jsonl" if (work / "gate").exists() else work / "data" / "eval.jsonl"
    out = {}
    for name, f in (("train", work / "data" / "train.jsonl"), ("gate", gate)):
        out[name] = [json.loads(line)["caller"] for line in f.read_text().splitlines()] if f.exists() else []
    return out


def test_untrusted_flood_is_stored_but_never_trained_on(tmp_path):
    who = populate(tmp_path, hostile_untrusted=True, honest_keys=HONEST_KEYS[:1])
    with Store(db_url(tmp_path)) as s:
        stored = s.count_feedback(caller=who["hostile"])
        assert s.untrusted_callers() == [who["hostile"]]
    assert who["flood_acked"] == stored == FLOOD  # stored, every post got its 200
    run, hooks, _ = iterate(tmp_path, None, {})  # the loop's defaults: exclude_untrusted=True
    sides = split_callers(tmp_path, run)
    assert sides["train"] and sides["gate"] and who["hostile"] not in sides["train"] + sides["gate"]
    assert run["dataset"]["stats"]["dropped"]["excluded_caller"] == FLOOD
    assert run["dataset"]["untrusted_callers"] == 1
    # One honest key's four items leave 2 to train on (< min_train_examples 4): the loop refuses.
    assert run["status"] == "failed" and run["reason"].startswith("not enough training data"), run
    assert hooks.loaded == [] and hooks.promoted == [] and hooks.live == "v0000"
    print(f"\n[poisoning/untrusted] hostile feedback stored: {stored}, in training: 0, in the gate: 0; "
          f"run {run['status']}: {run['reason']}")


def test_caps_bound_training_and_held_out_sets_alike(tmp_path):
    populate(tmp_path, hostile_untrusted=False)
    with Store(db_url(tmp_path)) as s:
        hostile = next(k["caller"] for k in s.list_keys() if k["name"] == "hostile")
        plain = build_dataset(s, DatasetConfig(kind="dpo", eval_percent=20))
        capped = build_dataset(s, DatasetConfig(kind="dpo", eval_percent=20, max_per_caller=4))
        frac = build_dataset(s, DatasetConfig(kind="dpo", eval_percent=20, max_caller_fraction=0.25))

    def count(build, split):
        return sum(r["caller"] == hostile for r in getattr(build, split))

    assert count(plain, "train") + count(plain, "eval") == FLOOD
    assert count(capped, "train") + count(capped, "eval") == 4  # one cap over both sets
    # floor(0.25 * 52) = 13 per caller, counted before the split, so held-out is bounded as well.
    assert count(frac, "train") + count(frac, "eval") == 13
    for b in (plain, capped, frac):  # the held-out set is drawn across keys: every key has a voice in it
        assert len({r["caller"] for r in b.eval}) == 4
    print(f"\n[poisoning/caps] hostile rows train+held-out: uncapped {count(plain, 'train')}+{count(plain, 'eval')}, "
          f"max_per_caller=4 {count(capped, 'train')}+{count(capped, 'eval')}, "
          f"max_caller_fraction=0.25 {count(frac, 'train')}+{count(frac, 'eval')}")


def test_the_gate_counts_each_caller_once():
    """rl/gate.py's arithmetic: a flood of pairs is one voice; one honest caller alone still passes."""
    flood = summarize([1.0] * 10 + [-1.0] * 3, ["flood"] * 10 + ["a", "b", "c"])
    assert (flood["accuracy"], round(flood["pair_accuracy"], 2), flood["callers"]) == (0.25, 0.77, 4)
    base = summarize([0.0] * 13, ["flood"] * 10 + ["a", "b", "c"])
    tools = {"candidate": {"validity": 1.0}, "live": {"validity": 1.0}}
    ok, reason = decide(GateConfig(), {"candidate": flood, "live": base}, tools)
    assert not ok and "each caller one voice" in reason
    # Counted per pair (the gate before this defence) it would have passed: 0.77 beats 0 by 0.1.
    assert decide(GateConfig(min_accuracy=0.0), {"candidate": {**flood, "accuracy": flood["pair_accuracy"]},
                                                 "live": base}, tools)[0]
    alone = summarize([1.0, 1.0, -1.0], ["a"] * 3)
    assert alone["accuracy"] == alone["pair_accuracy"] == 2 / 3
    assert decide(GateConfig(), {"candidate": alone, "live": summarize([0.0] * 3, ["a"] * 3)}, tools)[0]


# Small and fast on the tiny model (as tests/test_learning_loop.py), enough for the flood to move it.
TRAIN = {"learning_rate": 2e-3, "max_steps": 6, "per_device_train_batch_size": 2, "max_length": 128}


def test_trusted_flood_trains_a_candidate_the_gate_rejects(tmp_path, tiny_model):
    pytest.importorskip("torch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    who = populate(tmp_path, hostile_untrusted=False)
    t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run, hooks, registry = iterate(tmp_path, tiny_model, {"train": TRAIN})
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cost = (f"iteration {time.monotonic() - t0:.0f} s wall, "
            f"{cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.0f} s CPU in its job and gate processes")
    sides = split_callers(tmp_path, run)
    hostile_share = sides["train"].count(who["hostile"]) / len(sides["train"])
    gate = run.get("gate") or {}
    pref = gate.get("preference") or {}
    last = (run["metrics"] or [{}])[-1]
    print(f"\n[poisoning/trusted] {FLOOD} hostile items vs {len(who['honest'])} honest keys x 4; training rows "
          f"{len(sides['train'])} ({hostile_share:.0%} hostile), gate pairs {len(sides['gate'])} from "
          f"{len(set(sides['gate']))} callers; last step reward accuracy {last.get('rewards/accuracies')}; "
          f"candidate {json.dumps(pref.get('candidate'))}; "
          f"run {run['status']}: {run['reason']}; {cost}")
    assert run["status"] == "rejected", run
    assert hostile_share > 0.7  # the flood dominated what was trained (nothing capped it here)...
    assert set(sides["gate"]) == {who["hostile"], *who["honest"]}
    cand = pref["candidate"]
    assert cand["callers"] == 4
    # ...and the candidate learned it: it agrees with the flood's held-out pairs, not with
    # the honest keys'. Counted per pair, the flood would be a majority; per caller it is one of four.
    assert cand["pair_accuracy"] > cand["accuracy"]
    assert cand["accuracy"] < gate["config"]["min_accuracy"]
    assert "each caller one voice" in run["reason"]
    assert hooks.loaded == [run["version"]] and hooks.promoted == [] and hooks.live == "v0000"
    assert registry.get(run["version"]).status == "rejected"
    assert registry.live().version == "v0000"
