"""Loop pieces that need no engine: configs, the gate's decision, run bookkeeping."""

from __future__ import annotations

import asyncio
import os

import pytest

from agentloop.rl.gate import GateConfig, decide
from agentloop.rl.loop import LoopConfig
from agentloop.serve.store.db import Store
from agentloop.serve.store.runs import ActiveRunExists


def test_loop_config_checks():
    cfg = LoopConfig.from_params({"method": "kto", "gate": {"min_accuracy_gain": 0.2}})
    assert cfg.method == "kto" and cfg.gate.min_accuracy_gain == 0.2
    for bad in ({"method": "ppo"}, {"eval_percent": 101}, {"nonsense": 1}, {"gate": {"min_eval_pairs": 0}}):
        with pytest.raises((ValueError, TypeError)):
            LoopConfig.from_params(bad)


def test_positive_rows_only_where_an_nll_term_learns_from_them():
    assert LoopConfig().train_positives  # DPO with DPOJobConfig's default sft_weight (> 0)
    assert not LoopConfig.from_params({"train": {"sft_weight": 0}}).train_positives
    assert not LoopConfig.from_params({"positives": False}).train_positives
    assert not LoopConfig.from_params({"method": "kto"}).train_positives


def test_gate_decision():
    cfg = GateConfig(min_accuracy_gain=0.1, min_eval_pairs=2)
    pref = {"candidate": {"accuracy": 0.8, "n": 5}, "live": {"accuracy": 0.5, "n": 5}}
    tools = {"candidate": {"validity": 1.0}, "live": {"validity": 1.0}}
    assert decide(cfg, pref, tools)[0]
    assert not decide(cfg, {**pref, "candidate": {"accuracy": 0.55, "n": 5}}, tools)[0]
    assert "held-out" in decide(cfg, {**pref, "candidate": {"accuracy": 1.0, "n": 1}}, tools)[1]
    ok, reason = decide(cfg, pref, {"candidate": {"validity": 0.5}, "live": {"validity": 1.0}})
    assert not ok and "validity" in reason


def test_gate_on_held_out_grades():
    """Grades beside the preference check: never below live; alone when there are too few pairs."""
    cfg = GateConfig(min_eval_pairs=2, min_graded_prompts=2)
    pref = {"candidate": {"accuracy": 0.8, "n": 5}, "live": {"accuracy": 0.5, "n": 5}}
    no_pairs = {"candidate": {"accuracy": 0.0, "n": 0}, "live": {"accuracy": 0.0, "n": 0}}
    tools = {"candidate": {"validity": 1.0}, "live": {"validity": 1.0}}

    def grades(c, lv, n=4):
        return {"candidate": {"mean": c, "n": n}, "live": {"mean": lv, "n": n}, "n": n, "unscored": 0}

    ok, reason = decide(cfg, pref, tools, grades(0.75, 0.5))
    assert ok and "held-out grades 0.75 vs live 0.50 over 4 prompts" in reason
    ok, reason = decide(cfg, pref, tools, grades(0.25, 0.5))
    assert not ok and reason == "held-out grades fell from 0.50 to 0.25 over 4 graded prompts"
    assert decide(GateConfig(max_grade_drop=0.25), pref, tools, grades(0.25, 0.5))[0]
    ok, reason = decide(cfg, no_pairs, tools, grades(0.5, 0.5))  # the grades decide: not lower than live
    assert ok and "0 held-out preference pairs: the grades decide" in reason
    assert not decide(cfg, no_pairs, tools, grades(0.25, 0.5))[0]
    ok, reason = decide(cfg, no_pairs, tools, grades(1.0, 0.0, n=1))  # too few graded prompts either
    assert not ok and reason == "only 0 held-out preference pairs (< 2) and 1 held-out graded prompts (< 2)"
    assert decide(cfg, pref, tools, grades(0.0, 1.0, n=1))[0]  # too few to count: the pairs decide
    with pytest.raises(ValueError):
        GateConfig(max_grade_drop=2)


def test_graded_check_scores_both_versions_on_the_same_prompts():
    from agentloop.rl.gate import graded_check
    from agentloop.rl.graders import build_graders
    from agentloop.rl.sampling import Prompt

    def prompt(i):
        return Prompt(("alice", f"h{i}", "{}"), {"messages": [{"role": "user", "content": f"q{i}"}], "n": 5,
                                                 "temperature": 1.5}, (f"fb-{i}",),
                      {"role": "assistant", "content": f"a{i}"})

    asked = []

    async def answer(body, version):
        asked.append((body, version))
        i = int(body["messages"][0]["content"][1:])
        if i == 2 and version == "v0001":
            raise ConnectionError("engine gone")
        right = version == "v0001" or i == 0
        text = f"a{i}" if right else "no"
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    out = asyncio.run(graded_check([prompt(i) for i in range(4)], answer, build_graders(),
                                   {"candidate": "v0001", "live": "v0000"}, max_tokens=32))
    # Prompt 2 failed for the candidate: left out for both, never a 0.
    assert out == {"candidate": {"mean": 1.0, "n": 3}, "live": {"mean": 1 / 3, "n": 3}, "n": 3, "unscored": 1}
    assert all(b["n"] == 1 and b["temperature"] == 0.0 and b["max_tokens"] == 32 for b, _ in asked)


def test_one_active_run_and_orphans(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    run = store.create_run(method="dpo", trigger="admin")
    with pytest.raises(ActiveRunExists):
        store.create_run(method="dpo", trigger="scheduler")
    store.add_run_metrics(run["id"], 1, {"loss": 0.69})
    assert store.run_metrics(run["id"])[0]["loss"] == 0.69
    # A run whose owner died is closed at the next start-up, which frees the slot.
    assert store.fail_orphaned_runs(lambda owner: False) == [run["id"]]
    assert store.get_run(run["id"])["status"] == "failed"
    assert store.create_run(method="kto", trigger="admin")["status"] == "queued"
    assert os.path.exists(tmp_path / "db.sqlite")


def test_scheduler_due_rule(tmp_path):
    from agentloop.serve.services.loop import run_due

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    cfg = LoopConfig.from_params({"min_new_feedback": 3, "period_seconds": 3600})
    assert run_due(store, cfg) == (False, 0)  # nothing to learn from
    for i in range(2):
        store.insert_completions([{"id": f"c{i}", "caller": "k", "model": "m", "stream": False, "status_code": 200,
                                   "request": {}}])
        store.insert_feedback({"id": f"f{i}", "caller": "k", "type": "thumbs", "completion_id": f"c{i}", "value": 1})
    first = store.oldest_feedback_time()
    assert run_due(store, cfg, now=first + 10) == (False, 2)      # too few, too soon
    assert run_due(store, cfg, now=first + 3601) == (True, 2)     # the period passed
    store.insert_completions([{"id": "c9", "caller": "k", "model": "m", "stream": False, "status_code": 200,
                               "request": {}}])
    store.insert_feedback({"id": "f9", "caller": "k", "type": "thumbs", "completion_id": "c9", "value": -1})
    assert run_due(store, cfg, now=first + 10) == (True, 3)       # enough new feedback
    run = store.create_run(method="dpo", trigger="scheduler")
    assert run_due(store, cfg, now=first + 10) == (False, 0)      # one run at a time
    store.update_run(run["id"], status="rejected")
    assert run_due(store, cfg)[1] == 0                            # counted from the last run's start


def test_train_on_new_leaves_out_what_the_live_lineage_was_trained_on(tmp_path):
    """LoopConfig.train_on: 'all' trains on every usable feedback again, 'new' only on feedback
    the live version and its ancestors were not trained on; the gate's held-out pairs are the
    same either way. (min_train_examples is set out of reach: the run stops before training,
    after writing its dataset, so no model is needed.)"""
    import asyncio
    import json

    from agentloop.rl.loop import Iteration
    from agentloop.rl.registry import AdapterRegistry
    from agentloop.rl.zero_adapter import write_zero_adapter
    from tests.test_datasets import World
    from tests.test_poisoning import Hooks
    from tests.test_rl_registry import BASE_CONFIG, adapter

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(BASE_CONFIG))
    reg = AdapterRegistry(tmp_path / "adapters")
    write_zero_adapter(base, reg.root / "v0000")
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    world = World(store)
    ids = []
    for i in range(50):
        c = world.completion(f"wrong {i}", prompt=f"q{i}")
        ids.append(world.feedback("correction", c, correction={"role": "assistant", "content": f"right {i}"})["id"])
    reg.commit(adapter(base, tmp_path / "a1"), parent="v0000", base_model=str(base), dataset_ids=ids[:35])
    hooks = Hooks()
    hooks.live = "v0001"

    def rows(run_id: str, split: str) -> list[dict]:
        path = tmp_path / "runs" / run_id / "data" / f"{split}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    out = {}
    for train_on in ("all", "new"):
        run = store.create_run(method="dpo", trigger="admin", params={})
        cfg = LoopConfig.from_params({"train_on": train_on, "min_train_examples": 1000})
        it = Iteration(store, reg, base_model=str(base), template="chatml-tools", hooks=hooks, config=cfg,
                       work_dir=tmp_path / "runs")
        done = asyncio.run(it.run(run))
        assert done["status"] == "failed" and "not enough" in done["reason"], done
        assert ("new training data" in done["reason"]) == (train_on == "new")
        out[train_on] = {s: [r["feedback_ids"][0] for r in rows(run["id"], s)] for s in ("train", "eval")}
    assert out["new"]["eval"] == out["all"]["eval"] and out["all"]["eval"]
    assert out["new"]["train"] == [i for i in out["all"]["train"] if i not in ids[:35]]
    assert out["new"]["train"] and set(out["new"]["train"]) <= set(ids[35:])
    assert hooks.promoted == [] and hooks.loaded == []
    store.close()
    assert LoopConfig().train_on == "new"  # the default: each piece of feedback is trained on once
    with pytest.raises(ValueError):
        LoopConfig.from_params({"train_on": "some"})
