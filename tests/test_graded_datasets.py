"""Rows from grades (rl/graded.py through rl/datasets.py): reference feedback alone builds DPO and KTO
data by grading the caller's logged answers of the conversation against the reference.

The unit part uses a real SQLite store (tests/test_datasets.World); the last test sends the reference
feedback through the HTTP API (keys mode, a scripted engine) and runs one real loop iteration on it
(dataset, DPO job on the tiny model, the preference gate), which trains only on graded rows.
"""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient

from agentloop.rl.datasets import DatasetConfig, build_dataset, is_positive
from agentloop.rl.graded import Scored, best_and_worst, kto_label, score_candidates
from agentloop.rl.graders import Case, Grade, Grader, GraderSet, build_graders
from agentloop.serve.store.db import Store
from tests.test_datasets import World
from tests.test_keys import add_key, bearer, db_url, make_app
from tests.test_poisoning import ScriptedEngine, iterate, split_callers

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"], "default": "c"}},
        "required": ["city"]}}}]


def call(city: str, **extra) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{city}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city, **extra})}}]}


def text(s: str) -> dict:
    return {"role": "assistant", "content": s}


@pytest.fixture
def world(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'agentloop.db'}")
    yield World(s)
    s.close()


def build(world, **cfg):
    cfg.setdefault("eval_percent", 0)
    graders = cfg.pop("graders", None)
    return build_dataset(world.store, DatasetConfig(**cfg), graders=graders)


def weather_world(world) -> dict:
    """Alice asked one question three times (three answers) and gave a reference on the worst; Bob asked
    the same and his answer is the right one; a text question with two answers and a reference."""
    q = "What's the weather in Paris?"
    right = world.completion(call("Paris"), prompt=q, tools=WEATHER)
    wrong_city = world.completion(call("London"), prompt=q, tools=WEATHER)
    refused = world.completion(text("I cannot check the weather."), prompt=q, tools=WEATHER)
    world.completion(call("Paris"), prompt=q, tools=WEATHER, caller="bob")
    ref = world.feedback("reference", refused, reference=call("paris", unit="c"))  # a default stated: same call
    yes = world.completion(text("Yes."), prompt="Is water wet?")
    no = world.completion("It depends.", "Yes.", prompt="Is water wet?")  # n=2: both choices are candidates
    ref2 = world.feedback("reference", no, reference=text("Yes."))
    return {"right": right, "wrong_city": wrong_city, "refused": refused, "ref": ref, "yes": yes, "ref2": ref2}


def test_reference_feedback_alone_builds_graded_dpo_pairs(world):
    w = weather_world(world)
    out = build(world)
    assert out.stats["by_source"] == {"reference": 2} and out.eval == []
    assert out.stats["graded"] == {"conversations": 2, "candidates": 5, "sampled": 0, "unscored": 0,
                                     "failed_grades": 0}
    weather, water = sorted(out.train, key=lambda r: r["prompt"][0]["content"], reverse=True)
    # Best (the right call: schema and reference match) against worst (a text answer where a call was
    # wanted); the wrong city (schema valid, reference not: 0.5) is between. Alice's answers only.
    assert weather["chosen"] == [call("Paris")] and weather["rejected"] == [text("I cannot check the weather.")]
    assert weather["graded"] is True and weather["source"] == "reference" and weather["tools"] == WEATHER
    assert weather["feedback_ids"] == [w["ref"]["id"]] and weather["caller"] == "alice"
    # The reference is never trained on verbatim: its 'paris' with unit stated appears on no side.
    assert all("unit" not in json.dumps(r["chosen"] + r["rejected"]) for r in out.train)
    assert water["chosen"] == [text("Yes.")] and water["rejected"] == [text("It depends.")]
    assert out.dataset_ids == sorted([w["ref"]["id"], w["ref2"]["id"]])
    # Human feedback rows are marked ungraded; reference rows leave only when not selected.
    assert build(world, sources=["correction"]).stats["dropped"] == {"source_not_selected": 2}


def test_margin_single_answers_and_positives(world):
    q = "Weather in Rome?"
    a = world.completion(call("Roma"), prompt=q, tools=WEATHER)
    b = world.completion(text("Sunny, probably."), prompt=q, tools=WEATHER)
    world.feedback("reference", a, reference=call("Rome"))
    # Scores 0.5 (a valid call to the wrong city) and 0 (text): a pair at margin 0.25, none at 0.6.
    assert [r["chosen"] for r in build(world).train] == [[call("Roma")]]
    strict = build(world, grade_margin=0.6)
    assert strict.train == [] and strict.stats["dropped"] == {"no_graded_pair": 1}
    # One answer, and it is right: no pair; with positives it is a positive-only row (training only).
    single = world.completion(call("Oslo"), prompt="Weather in Oslo?", tools=WEATHER)
    world.feedback("reference", single, reference=call("Oslo"))
    assert build(world, grade_margin=0.6).stats["dropped"] == {"no_graded_pair": 2}
    pos = build(world, grade_margin=0.6, positives=True, eval_percent=100)
    (row,) = pos.train
    assert is_positive(row) and row["chosen"] == [call("Oslo")] and row["graded"] and pos.eval == []
    # Rome's best scored 0.5: not enough to stand alone (graded_desirable_min 1.0); its text answer never.
    assert all(r["chosen"] != [b["response"]["choices"][0]["message"]] for r in pos.train)


def test_kto_labels_by_score(world):
    w = weather_world(world)
    out = build(world, kind="kto")
    got = sorted((r["prompt"][0]["content"], json.dumps(r["completion"]), r["label"]) for r in out.train)
    assert got == sorted([
        ("What's the weather in Paris?", json.dumps([call("Paris")]), True),
        ("What's the weather in Paris?", json.dumps([call("London")]), False),  # 0.5 <= undesirable_max
        ("What's the weather in Paris?", json.dumps([text("I cannot check the weather.")]), False),
        ("Is water wet?", json.dumps([text("Yes.")]), True),
        ("Is water wet?", json.dumps([text("It depends.")]), False)])
    assert all(r["graded"] and r["feedback_ids"] in ([w["ref"]["id"]], [w["ref2"]["id"]]) for r in out.train)
    assert out.stats["desirable"] == 2 and out.stats["undesirable"] == 3
    between = build(world, kind="kto", graded_undesirable_max=0.4)
    assert between.stats["dropped"] == {"graded_neutral": 1} and len(between.train) == 4


class Flaky(Grader):
    """Raises on text answers, scores calls 1: its failures must not make an answer worse."""

    type = "flaky"

    def applies(self, case: Case) -> bool:
        return True

    def score(self, case: Case) -> tuple[float, str]:
        if case.candidate.get("content"):
            raise RuntimeError("judge unreachable")
        return 1.0, "fine"


def test_failed_grades_leave_an_answer_unscored_not_worse(world):
    q = "Weather in Nice?"
    world.completion(call("Nice"), prompt=q, tools=WEATHER)
    refused = world.completion(text("No idea."), prompt=q, tools=WEATHER)
    world.feedback("reference", refused, reference=call("Nice"))
    out = build(world, graders=GraderSet([Flaky()]))
    assert out.train == [] and out.stats["dropped"] == {"no_graded_pair": 1}
    assert out.stats["graded"] == {"conversations": 1, "candidates": 2, "sampled": 0, "unscored": 1,
                                     "failed_grades": 1}
    kto = build(world, kind="kto", graders=GraderSet([Flaky()]))
    assert [r["label"] for r in kto.train] == [True] and kto.stats["dropped"] == {"ungraded": 1}
    # The deployment's defaults score both: a pair.
    assert len(build(world).train) == 1


def test_graded_rules():
    g = build_graders()
    scored = score_candidates(g, {"messages": [{"role": "user", "content": "q"}], "tools": WEATHER},
                              [call("A"), text("t"), call("B"), call("A", unit="c")], call("A"))
    assert [s.score for s in scored] == [1.0, 0.0, 0.5, 1.0]
    best, worst = best_and_worst(scored, 0.25)
    assert best is scored[0] and worst is scored[1]  # the first best, the last worst
    assert best_and_worst(scored[:1], 0.0) is None and best_and_worst([scored[0], scored[3]], 0.1) is None
    failed = Scored(text("x"), (Grade("j", "judge", "1", None, "down", "failed"),))
    assert failed.score is None and failed.failed == 1 and best_and_worst([scored[0], failed], 0.1) is None
    assert [kto_label(s, 1.0, 0.5) for s in (None, 1.0, 0.7, 0.5, 0.0)] == [None, True, None, False, False]
    with pytest.raises(ValueError):
        DatasetConfig(grade_margin=0)
    with pytest.raises(ValueError):
        DatasetConfig(graded_desirable_min=0.5, graded_undesirable_max=0.5)


GOOD = "Certainly! Tell me what you need."
BAD = "No. Figure it out yourself."


def feed_references(home, answers: dict[str, tuple[str, ...]], reference: str = GOOD) -> str:
    """Through the HTTP API (keys mode, a scripted engine): alice asks each prompt once per answer
    it is given (a regenerate each time) and sends `reference` as reference feedback on the first.
    Returns alice's caller id."""
    key, raw = add_key(home, "alice")
    eng = ScriptedEngine()
    with TestClient(make_app(home, eng)) as c:
        for prompt, said in answers.items():
            ids = []
            for answer in said:
                eng.answer = answer
                r = c.post("/v1/chat/completions", headers=bearer(raw),
                           json={"model": "agentloop", "messages": [{"role": "user", "content": prompt}]})
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
            r = c.post("/v1/feedback", headers=bearer(raw), json={
                "type": "reference", "completion_id": ids[0], "reference": {"role": "assistant", "content": reference}})
            assert r.status_code == 200, r.text
        c.app.state.gw.writer.flush()
    return key["caller"]


TRAIN = {"learning_rate": 2e-3, "max_steps": 8, "per_device_train_batch_size": 2, "max_length": 128}


def test_a_run_on_reference_feedback_alone_trains_on_graded_pairs(tmp_path, tiny_model):
    """Through the API: each prompt asked twice (a regenerate), a reference on the first answer; no
    thumbs, ratings, corrections or pairs. The loop's dataset is graded rows only, it trains, and the
    gate (on held-out graded pairs) promotes the candidate that prefers the reference-like answer."""
    pytest.importorskip("torch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    caller = feed_references(tmp_path, {f"Could you check invoice {i} for me?": (BAD, GOOD) if i % 2 else (GOOD, BAD)
                               for i in range(16)})
    run, hooks, _ = iterate(tmp_path, tiny_model, {"train": TRAIN, "eval_percent": 25,
                                                   "gate": {"min_accuracy_gain": 0.5, "min_eval_pairs": 2}})
    stats = run["dataset"]["stats"]
    print(f"\n[graded run] dataset {run['dataset']['train']} train / {run['dataset']['eval']} held out, graded "
          f"{stats['graded']}; gate {json.dumps((run.get('gate') or {}).get('preference'))}; "
          f"run {run['status']}: {run['reason']}")
    assert stats["by_source"] == {"reference": 16} and stats["graded"]["candidates"] == 32
    sides = split_callers(tmp_path, run)
    assert len(sides["train"]) >= 8 and len(sides["gate"]) >= 2
    rows = [json.loads(line) for line in (tmp_path / "runs" / run["id"] / "data" / "train.jsonl").read_text()
            .splitlines()]
    assert all(r["graded"] and r["chosen"][0]["content"] == GOOD and r["rejected"][0]["content"] == BAD
               for r in rows)
    assert run["status"] == "promoted", run
    assert hooks.promoted == [run["version"]] and caller in sides["train"]
