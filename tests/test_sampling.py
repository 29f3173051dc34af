"""On-policy sampling (rl/sampling.py) and graded pairs from samples in the loop.

Unit part on a real SQLite store (tests/test_datasets.World): which prompts are sampled (never a
held-out one), the sampling request, failures counted; the dataset grades samples with the logged
answers. Then one real loop iteration on the tiny model whose only signal is reference feedback on
answers that are all wrong: the right answers come from sampling the live version (a scripted serving
side, tests/test_poisoning.Hooks), the graders pair them, it trains and promotes. The real gateway's
sampling path (the chat path, unlogged, real engine) is in the last test.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from agentloop.rl.datasets import DatasetConfig, build_dataset
from agentloop.rl.loop import LoopConfig
from agentloop.rl.rows import bucket, group_key, prompt_of
from agentloop.rl.sampling import SamplingConfig, sample, sampling_body, sampling_prompts
from agentloop.rl.schema import conversation_hash
from agentloop.serve.store.db import Store
from tests.test_datasets import World
from tests.test_graded_datasets import BAD, GOOD, WEATHER, call, feed_references, text
from tests.test_poisoning import iterate



@pytest.fixture
def world(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'agentloop.db'}")
    yield World(s)
    s.close()


def held_out(prompt: str, percent: int) -> bool:
    return bucket(conversation_hash({"messages": [{"role": "user", "content": prompt}]}), "") < percent


def prompts_split(percent: int, n_train: int, n_held: int, stem: str = "Could you check invoice") -> tuple[list, list]:
    train, held, i = [], [], 0
    while len(train) < n_train or len(held) < n_held:
        p = f"{stem} {i} for me?"
        i += 1
        side = held if held_out(p, percent) else train
        if len(side) < (n_held if side is held else n_train):
            side.append(p)
    return train, held


def test_which_prompts_are_sampled(world):
    train, held = prompts_split(50, 3, 2)
    refs = {}
    for p in train + held:
        c = world.completion(BAD, prompt=p)
        refs[p] = world.feedback("reference", c, reference=text(GOOD))
    world.thumbs(world.completion("meh", prompt="thumbs only"), 1)  # no reference: not sampled
    mallory = world.completion(BAD, prompt=train[0], caller="mallory")
    world.feedback("reference", mallory, reference=text(BAD))
    cfg = SamplingConfig()
    got = sampling_prompts(world.store, cfg, eval_percent=50, exclude_callers=("mallory",))
    # Newest feedback first; held-out conversations never; excluded callers never.
    assert [p.request["messages"][0]["content"] for p in got] == train[::-1]
    assert all(p.feedback_ids == (refs[p.request["messages"][0]["content"]]["id"],) for p in got)
    assert got[0].key == group_key("alice", prompt_of(world.store.get_completion(refs[train[-1]]["completion_id"])))
    trained = (refs[train[0]]["id"],)
    assert len(sampling_prompts(world.store, cfg, eval_percent=50, trained_feedback_ids=trained,
                                exclude_callers=("mallory",))) == 2
    assert len(sampling_prompts(world.store, SamplingConfig(max_prompts=1), eval_percent=50)) == 1
    assert {p.key[0] for p in sampling_prompts(world.store, cfg, eval_percent=50)} == {"alice", "mallory"}


def test_the_sampling_request_keeps_the_prompt_and_sets_the_sampling():
    logged = {"model": "agentloop@v0002", "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER,
              "tool_choice": "required", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
              "temperature": 0, "seed": 7, "max_tokens": 64, "reasoning_effort": "low", "user": "u-1"}
    body = sampling_body(logged, SamplingConfig(k=3, temperature=0.9, max_tokens=128))
    assert body == {"messages": logged["messages"], "tools": WEATHER, "tool_choice": "required",
                    "reasoning_effort": "low", "n": 3, "temperature": 0.9, "max_tokens": 64}
    assert sampling_body({"messages": []}, SamplingConfig(max_tokens=128))["max_tokens"] == 128
    for bad in ({"k": 17}, {"k": -1}, {"temperature": 3}, {"max_tokens": 0}, {"concurrency": True}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    assert LoopConfig.from_params({"sampling": {"k": 2}}).sampling.k == 2


def test_sampling_failures_are_counted_and_the_rest_kept(world):
    train, _ = prompts_split(0, 3, 0)
    for p in train:
        world.feedback("reference", world.completion(BAD, prompt=p), reference=text(GOOD))
    prompts = sampling_prompts(world.store, SamplingConfig(), eval_percent=0)
    calls = []

    async def generate(body):
        calls.append(body)
        if body["messages"][0]["content"] == train[1]:
            raise ConnectionError("engine gone")
        return {"choices": [{"index": 1, "message": text("b")}, {"index": 0, "message": text("a")}, {"index": 2}]}

    out, stats = asyncio.run(sample(prompts, generate, SamplingConfig(k=2)))
    assert len(calls) == 3 and all(b["n"] == 2 for b in calls)
    assert (stats["prompts"], stats["answers"], stats["failed"]) == (3, 4, 1)
    assert sorted(out.values(), key=str) == [[text("a"), text("b")]] * 2


def test_samples_are_graded_with_the_logged_answers(world):
    q = "Weather in Paris?"
    c = world.completion(text("No idea."), prompt=q, tools=WEATHER)
    ref = world.feedback("reference", c, reference=call("Paris"))
    key = group_key("alice", prompt_of(c))
    samples = {key: [call("Paris"), call("London"), text("No idea."), call("Paris")]}
    out = build_dataset(world.store, DatasetConfig(eval_percent=0), samples=samples)
    (row,) = out.train
    assert row["chosen"] == [call("Paris")] and row["rejected"] == [text("No idea.")]
    assert row["graded"] and row["feedback_ids"] == [ref["id"]]
    # Distinct answers: the logged one and two new ones (the repeats are one candidate).
    assert out.stats["graded"] == {"conversations": 1, "candidates": 3, "sampled": 2, "unscored": 0,
                                   "failed_grades": 0}
    # Without samples the one logged answer has nothing to be paired with.
    assert build_dataset(world.store, DatasetConfig(eval_percent=0)).train == []


TRAIN = {"learning_rate": 2e-3, "max_steps": 8, "per_device_train_batch_size": 2, "max_length": 128}


def test_a_loop_iteration_learns_from_sampled_answers_graded_against_references(tmp_path, tiny_model):
    """Every logged answer to a training prompt is the wrong one; only sampling the live version finds
    the right one. The held-out prompts have both logged (a regenerate), so the gate can judge."""
    pytest.importorskip("torch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, held = prompts_split(25, 10, 4)
    feed_references(tmp_path, {p: (BAD, GOOD) if p in held else (BAD,) for p in train + held})

    def hooks_factory(hooks):
        hooks.samples = [BAD, GOOD, "Maybe later."]

    run, hooks, _ = iterate(tmp_path, tiny_model, {"train": TRAIN, "eval_percent": 25, "sampling": {"k": 3},
                                                   "gate": {"min_accuracy_gain": 0.5, "min_eval_pairs": 2}},
                            setup=hooks_factory)
    ds = run["dataset"]
    print(f"\n[on-policy] sampling {ds['sampling']}; graded {ds['stats']['graded']}; dataset {ds['train']} train / "
          f"{ds['eval']} held out; gate {json.dumps((run.get('gate') or {}).get('preference'))}; "
          f"phases {run.get('result', {}).get('phase_seconds')}; run {run['status']}: {run['reason']}")
    # Only training prompts were sampled, each once, from the live version, k answers each.
    sampled = [b["messages"][0]["content"] for b, _ in hooks.sampled if b["n"] == 3]
    assert sorted(sampled) == sorted(train) and {v for b, v in hooks.sampled if b["n"] == 3} == {"v0000"}
    assert ds["sampling"]["prompts"] == 10 and ds["sampling"]["answers"] == 30 and ds["sampling"]["failed"] == 0
    assert ds["stats"]["graded"]["sampled"] == 20  # per prompt: GOOD and "Maybe later." are new
    rows = [json.loads(line) for line in (tmp_path / "runs" / run["id"] / "data" / "train.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 10 and all(r["graded"] and r["chosen"][0]["content"] == GOOD for r in rows)
    assert run["status"] == "promoted", run
    assert hooks.promoted == [run["version"]] and run["result"]["phase_seconds"]["sampling"] >= 0
    # The gate also had both versions answer the held-out graded prompts (greedy, one answer each).
    greedy = [(b["messages"][0]["content"], v) for b, v in hooks.sampled if b["n"] == 1]
    assert sorted(greedy) == sorted((p, v) for p in held for v in ("v0000", run["version"]))
    assert run["gate"]["grades"]["n"] == 4 and "held-out grades" in run["reason"]


def test_without_held_out_pairs_the_held_out_grades_decide(tmp_path, tiny_model):
    """Reference feedback on single answers everywhere: no held-out pair for the preference check,
    so the gate asks both versions for the held-out graded prompts and compares their grades."""
    pytest.importorskip("torch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, held = prompts_split(25, 8, 3)
    feed_references(tmp_path, {p: (BAD,) for p in train + held})
    params = {"train": TRAIN, "eval_percent": 25, "sampling": {"k": 2}, "gate": {"min_graded_prompts": 2}}

    def setup(hooks):
        # The live version (v0000) sometimes finds the right answer when sampled, never greedily
        # (n=1 takes its first); the candidate (v0001) answers right.
        hooks.samples = {"v0000": [BAD, GOOD], "v0001": [GOOD]}

    run, hooks, _ = iterate(tmp_path, tiny_model, params, setup=setup)
    print(f"\n[grades gate] {run['status']}: {run['reason']}; grades {run['gate']['grades']}")
    assert run["gate"]["preference"]["candidate"]["n"] == 0 and run["gate"]["grades"]["n"] == 3
    assert run["status"] == "promoted" and "the grades decide" in run["reason"], run
    assert run["gate"]["grades"]["candidate"]["mean"] == 1.0 and run["gate"]["grades"]["live"]["mean"] == 0.0


def test_the_gateway_samples_through_the_chat_path_unlogged(server):
    """The session's real gateway and engine: a run samples k answers per training prompt with
    references, through the chat path, and none of them is logged as a user's completion."""
    prompt = f"Say something nice {time.time_ns()}."
    h = {"Authorization": "Bearer user-key"}
    r = httpx.post(f"{server.base_url}/chat/completions", headers=h, timeout=120, json={
        "model": "agentloop", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    fb = httpx.post(f"{server.base_url}/feedback", headers=h, json={
        "type": "reference", "completion_id": r.json()["id"], "reference": {"role": "assistant", "content": "Hi!"}})
    assert fb.status_code == 200, fb.text
    with server.db() as con:
        before = con.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    params = {"eval_percent": 0, "min_train_examples": 100000, "sampling": {"k": 3, "max_tokens": 8}}
    run = server.admin("POST", "/admin/train", json={"params": params}).json()
    deadline = time.monotonic() + 300
    while run["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1)
        run = server.admin("GET", f"/admin/runs/{run['id']}").json()
    assert run["status"] == "failed" and "not enough" in run["reason"], run  # it stops before training
    s = run["dataset"]["sampling"]
    assert s["prompts"] >= 1 and s["failed"] == 0 and s["answers"] == 3 * s["prompts"], s
    assert run["dataset"]["stats"]["graded"]["candidates"] >= 1
    with server.db() as con:
        assert con.execute("SELECT COUNT(*) FROM completions").fetchone()[0] == before
