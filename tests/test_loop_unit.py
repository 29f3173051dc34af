"""Loop pieces that need no engine: configs, the gate's decision, run bookkeeping."""

from __future__ import annotations

import os

import pytest

from rl.gate import GateConfig, decide
from rl.loop import LoopConfig
from serve.store import Store
from serve.store_runs import ActiveRunExists


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
    from serve.loop import run_due

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
