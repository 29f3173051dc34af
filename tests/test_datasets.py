"""rl/datasets.py: DPO/KTO datasets built from a real SQLite store of completions and feedback."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from agentloop.rl.datasets import (
    DatasetBuild, DatasetConfig, build_dataset, char_length, is_positive, kto_weights,
    template_kwargs,
)
from agentloop.rl.schema import conversation_hash
from agentloop.serve.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


class World:
    """A store plus helpers to log completions and feedback with increasing times."""

    def __init__(self, store: Store):
        self.store = store
        self.clock = itertools.count(1000)
        self.ids = itertools.count()

    def completion(self, *answers, caller="alice", prompt="hello", tools=None, version="v1",
                   status=200, **request_extra) -> dict:
        request = {"model": "agentloop", "messages": [{"role": "user", "content": prompt}], **request_extra}
        if tools:
            request["tools"] = tools
        choices = [{"index": i, "finish_reason": "stop",
                    "message": a if isinstance(a, dict) else {"role": "assistant", "content": a}}
                   for i, a in enumerate(answers or ("ok",))]
        row = {"id": f"chatcmpl-{next(self.ids)}", "created_at": float(next(self.clock)), "caller": caller,
               "model": "agentloop", "stream": False, "status_code": status, "version": version,
               "request": request, "response": {"object": "chat.completion", "choices": choices},
               "conversation_hash": conversation_hash(request)}
        self.store.insert_completions([row])
        return row

    def feedback(self, ftype: str, comp: dict | None = None, *, caller=None, **kw) -> dict:
        ref = comp or self.store.get_completion(kw["chosen_id"])
        row = {"id": f"fb-{next(self.ids):04d}", "created_at": float(next(self.clock)), "type": ftype,
               "caller": caller or ref["caller"], "version": ref["version"],
               "conversation_hash": ref["conversation_hash"], **kw}
        if comp is not None:
            row["completion_id"] = comp["id"]
        return self.store.insert_feedback(row)

    def thumbs(self, comp, value, **kw):
        return self.feedback("thumbs", comp, value=value, **kw)

    def rating(self, comp, value, **kw):
        return self.feedback("rating", comp, value=value, **kw)


@pytest.fixture
def world(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'agentloop.db'}")
    yield World(s)
    s.close()


def build(world, **cfg) -> DatasetBuild:
    cfg.setdefault("eval_percent", 0)
    return build_dataset(world.store, DatasetConfig(**cfg))


def by_source(rows) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["source"], []).append(r)
    return out


# ---------------------------------------------------------------- DPO

def test_dpo_pairs_from_each_source(world):
    tool_answer = {"role": "assistant", "content": None, "reasoning": "look it up",
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "lookup", "arguments": {"q": "x"}}}]}
    a = world.completion(tool_answer, prompt="weather?", tools=TOOLS, reasoning_effort="high")
    b = world.completion({"role": "assistant", "content": "no idea", "reasoning": "hmm"},
                         prompt="weather?", tools=TOOLS, reasoning_effort="high")
    pw = world.feedback("pairwise", chosen_id=a["id"], rejected_id=b["id"])
    n2 = world.completion("first", "second", prompt="pick")
    pw_idx = world.feedback("pairwise", chosen_id=n2["id"], chosen_index=1, rejected_id=n2["id"], rejected_index=0)
    c = world.completion("2+2=5", prompt="sum")
    fix = {"role": "assistant", "content": "2+2=4", "reasoning_content": "add"}
    corr = world.feedback("correction", c, correction=fix)
    u1, d1, d2 = (world.completion(t, prompt="joke") for t in ("funny", "meh", "bad"))
    t_up, t_d1, t_d2 = world.thumbs(u1, 1), world.thumbs(d1, -1), world.thumbs(d2, -1)
    world.thumbs(world.completion("alone", prompt="lonely"), 1)  # nothing to pair it with
    # Same messages, rendered with thinking on vs off: no single prompt for DPO.
    on, off = world.completion("x", prompt="t", reasoning_effort="low"), world.completion("y", prompt="t")
    world.feedback("pairwise", chosen_id=on["id"], rejected_id=off["id"])

    out = build(world)
    src = by_source(out.train)
    assert {k: len(v) for k, v in src.items()} == {"pairwise": 2, "correction": 1, "thumbs": 2}
    assert out.eval == [] and out.stats["by_source"] == {"correction": 1, "pairwise": 2, "thumbs": 2}
    assert out.stats["dropped"] == {"unpaired_thumbs": 1, "template_kwargs_mismatch": 1}

    p = next(r for r in src["pairwise"] if r["feedback_ids"] == [pw["id"]])
    assert p["prompt"] == a["request"]["messages"] and p["tools"] == TOOLS
    assert p["chat_template_kwargs"] == {"enable_thinking": True}
    assert p["chosen"] == [{"role": "assistant", "content": None, "reasoning_content": "look it up",
                            "tool_calls": [{"id": "call_1", "type": "function",
                                            "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]}]
    assert p["rejected"] == [{"role": "assistant", "content": "no idea", "reasoning_content": "hmm"}]
    assert p["conversation_hash"] == a["conversation_hash"] and p["caller"] == "alice" and p["version"] == "v1"

    q = next(r for r in src["pairwise"] if r["feedback_ids"] == [pw_idx["id"]])
    assert q["chosen"][0]["content"] == "second" and q["rejected"][0]["content"] == "first"
    assert q["tools"] is None and q["chat_template_kwargs"] == {"enable_thinking": False}

    (cr,) = src["correction"]
    assert cr["chosen"] == [fix] and cr["rejected"] == [{"role": "assistant", "content": "2+2=5"}]

    # Each down is paired with the (only) up, in time order.
    assert [r["feedback_ids"] for r in src["thumbs"]] == [[t_up["id"], t_d1["id"]], [t_up["id"], t_d2["id"]]]
    assert [r["rejected"][0]["content"] for r in src["thumbs"]] == ["meh", "bad"]
    assert all(r["chosen"][0]["content"] == "funny" for r in src["thumbs"])
    assert out.dataset_ids == sorted([pw["id"], pw_idx["id"], corr["id"], t_up["id"], t_d1["id"], t_d2["id"]])
    assert build(world, sources=["correction"]).stats["by_source"] == {"correction": 1}


def test_dpo_positives_keep_unpaired_thumbs_up_for_training_only(world):
    """positives=True: a thumbs-up with no down to pair becomes a chosen == rejected row (an NLL-only
    example); a down without an up stays dropped; no such row is ever a held-out pair, and a
    conversation never lands on both sides."""
    lone_up = world.thumbs(world.completion("alone", prompt="lonely"), 1)
    world.thumbs(world.completion("sad", prompt="grim"), -1)
    u, d = world.completion("funny", prompt="joke"), world.completion("meh", prompt="joke")
    world.thumbs(u, 1), world.thumbs(d, -1)
    out = build(world, positives=True)
    src = by_source(out.train)
    (pos,) = src["thumbs_up"]
    assert pos["chosen"] == pos["rejected"] == [{"role": "assistant", "content": "alone"}]
    assert pos["feedback_ids"] == [lone_up["id"]] and is_positive(pos)
    assert len(src["thumbs"]) == 1 and not is_positive(src["thumbs"][0])
    assert out.stats["dropped"] == {"unpaired_thumbs": 1}
    assert build(world).stats["dropped"] == {"unpaired_thumbs": 2}  # off by default

    for i in range(120):  # held-out buckets: positives train unless their conversation is held out
        world.thumbs(world.completion(f"fine {i}", prompt=f"p{i}"), 1)
        if i % 2:
            c = world.completion(f"wrong {i}", prompt=f"p{i}")
            world.feedback("correction", c, correction={"role": "assistant", "content": f"right {i}"})
    out = build(world, positives=True, eval_percent=30)
    assert out.eval and not any(is_positive(r) for r in out.eval)
    held = {r["conversation_hash"] for r in out.eval}
    assert not held & {r["conversation_hash"] for r in out.train}
    n_pos = sum(is_positive(r) for r in out.train)
    held_corrections = sum(r["source"] == "correction" for r in out.eval)  # each one's conversation has a positive
    assert held_corrections and out.stats["dropped"]["positive_held_out"] == held_corrections
    assert n_pos + held_corrections == 121


def test_dpo_skips_pairs_without_signal_or_completions(world):
    a, b = world.completion("same", prompt="q"), world.completion("same", prompt="q")
    world.feedback("pairwise", chosen_id=a["id"], rejected_id=b["id"])  # identical answers
    world.feedback("correction", a, correction={"role": "assistant", "content": "same"})
    other = world.completion("z", prompt="another")
    world.feedback("pairwise", chosen_id=a["id"], rejected_id=other["id"])  # not via the API: mismatched
    world.feedback("correction", {**a, "id": "chatcmpl-deleted"}, correction={"role": "assistant", "content": "k"})
    out = build(world)
    assert out.train == []
    assert out.stats["dropped"] == {"identical_sides": 2, "conversation_mismatch": 1, "completion_missing": 1}


def test_thumbs_pairs_stay_within_one_caller(world):
    up = world.completion("good", prompt="p", caller="alice")
    down = world.completion("bad", prompt="p", caller="bob")
    world.thumbs(up, 1)
    world.thumbs(down, -1)
    assert build(world).train == []


def test_thinking_rows_need_reasoning_on_every_answer(world):
    # Served with thinking on, the prompt ends inside a <think> block: an answer
    # without reasoning cannot be trained in that context.
    think = {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
    c = world.completion(think, prompt="2+2?", reasoning_effort="low")
    world.feedback("correction", c, correction={"role": "assistant", "content": "four"})
    world.feedback("correction", c, correction={"role": "assistant", "content": "four", "reasoning_content": "sum"},
                   caller="bob")
    out = build(world)
    assert [r["chosen"][0]["reasoning_content"] for r in out.train] == ["sum"]
    assert out.stats["dropped"] == {"thinking_without_reasoning": 1}
    # KTO: the "sum" correction, and the answer both corrections corrected (undesirable, deduped).
    assert sorted(r["label"] for r in build(world, kind="kto").train) == [False, True]


# ---------------------------------------------------------------- KTO

def test_kto_labels_thresholds_and_corrections(world):
    fbs = {}
    for v in (1, -1):
        fbs[f"thumbs{v}"] = world.thumbs(world.completion(f"t{v}", prompt=f"t{v}"), v)
    for v in range(1, 6):
        fbs[f"rating{v}"] = world.rating(world.completion(f"r{v}", prompt=f"r{v}"), v)
    c = world.completion("wrong", prompt="c")
    fbs["corr"] = world.feedback("correction", c, correction={"role": "assistant", "content": "right"})
    out = build(world, kind="kto")
    label = {r["feedback_ids"][0]: r["label"] for r in out.train if r["source"] != "correction"}
    assert label == {fbs["thumbs1"]["id"]: True, fbs["thumbs-1"]["id"]: False,
                     fbs["rating1"]["id"]: False, fbs["rating2"]["id"]: False,
                     fbs["rating4"]["id"]: True, fbs["rating5"]["id"]: True}
    assert out.stats["dropped"] == {"rating_neutral": 1}
    # A correction: the correction is desirable, the answer it corrected undesirable.
    corr = sorted(((r["completion"][0]["content"], r["label"]) for r in out.train if r["source"] == "correction"))
    assert corr == [("right", True), ("wrong", False)]
    assert all(r["feedback_ids"] == [fbs["corr"]["id"]] for r in out.train if r["source"] == "correction")
    assert set(out.train[0]) == {"prompt", "completion", "label", "tools", "chat_template_kwargs",
                                 "source", "caller", "conversation_hash", "version", "feedback_ids", "graded"}
    assert out.stats["desirable"] == 4 and out.stats["undesirable"] == 4
    strict = build(world, kind="kto", rating_desirable_min=5, rating_undesirable_max=1, sources=("rating",))
    assert sorted(r["label"] for r in strict.train) == [False, True]
    assert strict.stats["dropped"] == {"rating_neutral": 3, "source_not_selected": 3}
    # Corrections alone give both classes (what KTOTrainer needs); a correction that repeats the answer
    # gives only the desirable side.
    same = world.completion("same", prompt="d")
    world.feedback("correction", same, correction={"role": "assistant", "content": "same"})
    only = build(world, kind="kto", sources=("correction",))
    assert sorted(r["label"] for r in only.train) == [False, True, True]


def _trl_accepts(d: float, u: float, n_d: int, n_u: int) -> bool:
    """TRL KTOTrainer's own check (trl/trainer/kto_trainer.py, 2-decimal rounded bounds)."""
    d_lo, d_hi = round(n_u * u / n_d, 2), round(n_u * u / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * d / n_u / 1.33, 2), round(n_d * d / n_u, 2)
    return d_lo <= d <= d_hi or u_lo <= u <= u_hi


@pytest.mark.parametrize("n_d,n_u", [(10, 10), (12, 10), (13, 10), (14, 10), (100, 3), (3, 100), (1, 2),
                                     (7, 1), (1, 1000), (999, 1)])
def test_kto_weights_follow_trl_guidance(n_d, n_u):
    d, u = kto_weights(n_d, n_u)
    assert 1 <= d * n_d / (u * n_u) <= 4 / 3
    assert d == 1.0 or u == 1.0  # adjust one class, never both
    assert _trl_accepts(d, u, n_d, n_u)
    assert kto_weights(n_d, 0) == kto_weights(0, n_u) == (1.0, 1.0)


def test_kto_build_reports_weights_for_unbalanced_data(world):
    for i in range(6):
        world.thumbs(world.completion(f"a{i}", prompt=f"p{i}"), 1)
    for i in range(2):
        world.thumbs(world.completion(f"b{i}", prompt=f"q{i}"), -1)
    out = build(world, kind="kto")
    assert (out.stats["desirable"], out.stats["undesirable"]) == (6, 2)
    assert out.desirable_weight == 1.0 and out.undesirable_weight == pytest.approx(3 / (7 / 6), abs=1e-4)


def test_changed_vote_replaces_the_earlier_one(world):
    c = world.completion("hm", prompt="x")
    world.thumbs(c, 1)
    last = world.thumbs(c, -1)
    world.thumbs(c, 1, caller="bob")  # another caller's vote is their own
    out = build(world, kind="kto", dedupe=False)
    assert sorted((r["caller"], r["label"]) for r in out.train) == [("alice", False), ("bob", True)]
    assert last["id"] in out.dataset_ids and out.stats["dropped"] == {"superseded": 1}


# ---------------------------------------------------------------- policy

def _split_world(world, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        up, down = world.completion(f"good {i}", prompt=f"q{i}"), world.completion(f"bad {i}", prompt=f"q{i}")
        world.thumbs(up, 1)
        world.thumbs(down, -1)


def _side(out) -> dict[str, str]:
    return {fid: split for split in ("train", "eval") for r in getattr(out, split) for fid in r["feedback_ids"]}


def test_split_is_by_conversation_and_stable(world):
    _split_world(world, 150)
    out = build(world, kind="kto", eval_percent=20)
    train_convs = {r["conversation_hash"] for r in out.train}
    eval_convs = {r["conversation_hash"] for r in out.eval}
    assert train_convs and eval_convs and not train_convs & eval_convs
    assert 0.08 < len(eval_convs) / 150 < 0.35
    assert out.stats["train"] + out.stats["eval"] == 300
    again = build(world, kind="kto", eval_percent=20)
    assert (again.train, again.eval) == (out.train, out.eval)  # same store, same build
    before = _side(out)
    _split_world(world, 50, start=150)  # more data later never moves old examples
    grown = _side(build(world, kind="kto", eval_percent=20))
    assert {k: grown[k] for k in before} == before
    salted = build(world, kind="kto", eval_percent=20, split_salt="round-2")
    assert {r["conversation_hash"] for r in salted.eval} != eval_convs
    assert build(world, kind="kto", eval_percent=100).train == []
    # DPO pairs split by the same rule.
    dpo = build(world, eval_percent=20)
    assert not {r["conversation_hash"] for r in dpo.train} & {r["conversation_hash"] for r in dpo.eval}


def test_dedupe_identical_examples(world):
    for caller in ("alice", "bob", "carol"):
        world.thumbs(world.completion("same answer", prompt="same question", caller=caller), 1)
    out = build(world, kind="kto")
    assert len(out.train) == 1 and out.train[0]["caller"] == "alice"  # the oldest copy stays
    assert out.stats["dropped"] == {"duplicate": 2} and out.dataset_ids == [out.train[0]["feedback_ids"][0]]
    assert len(build(world, kind="kto", dedupe=False).train) == 3


def test_length_limit_char_estimate_and_tokenizer(world):
    world.thumbs(world.completion("short", prompt="hi"), 1)
    long = world.thumbs(world.completion("x" * 2000, prompt="hi"), 1)
    out = build(world, kind="kto", max_length=200)
    assert len(out.train) == 1 and long["id"] not in out.dataset_ids
    assert out.stats["dropped"] == {"too_long": 1}
    assert char_length([{"role": "user", "content": "x" * 400}], None, {}) > 100

    class WordTokenizer:
        """One token per word; records the kwargs it was rendered with."""

        seen: list = []

        def apply_chat_template(self, messages, tools=None, tokenize=True, **kw):
            self.seen.append(kw)
            return {"input_ids": " ".join(m["content"] or "" for m in messages).split()}

    tok = WordTokenizer()
    out = build_dataset(world.store, DatasetConfig(kind="kto", eval_percent=0, max_length=3), tokenizer=tok)
    assert len(out.train) == 2  # "hi" + one word each: 2 tokens, under 3
    assert tok.seen[0] == {"enable_thinking": False}
    out = build_dataset(world.store, DatasetConfig(kind="kto", eval_percent=0, max_length=1), tokenizer=tok)
    assert out.train == [] and out.stats["dropped"] == {"too_long": 2}


def test_per_caller_cap_is_deterministic(world):
    for i in range(10):
        world.thumbs(world.completion(f"a{i}", prompt=f"a{i}", caller="alice"), 1)
    for i in range(2):
        world.thumbs(world.completion(f"b{i}", prompt=f"b{i}", caller="bob"), 1)
    out = build(world, kind="kto", max_per_caller=3)
    assert out.stats["per_caller"] == {"alice": 3, "bob": 2}
    assert out.stats["dropped"] == {"caller_cap": 7}
    assert build(world, kind="kto", max_per_caller=3).train == out.train
    picked = [r["completion"][0]["content"] for r in out.train if r["caller"] == "alice"]
    assert picked != ["a0", "a1", "a2"]  # a hash sample over the caller's history, not the oldest
    frac = build(world, kind="kto", max_caller_fraction=0.5)  # floor(0.5 * 12) = 6
    assert frac.stats["per_caller"] == {"alice": 6, "bob": 2}
    both = build(world, kind="kto", max_caller_fraction=0.5, max_per_caller=4)
    assert both.stats["per_caller"] == {"alice": 4, "bob": 2}


def test_excluded_callers_versions_and_since(world):
    world.thumbs(world.completion("a", prompt="a", caller="alice"), 1)
    world.thumbs(world.completion("m", prompt="m", caller="mallory"), 1)
    late = world.thumbs(world.completion("b", prompt="b", caller="bob", version="v2"), 1)
    out = build(world, kind="kto", exclude_callers=["mallory"])
    assert {r["caller"] for r in out.train} == {"alice", "bob"}
    assert out.stats["dropped"] == {"excluded_caller": 1} and out.stats["feedback_seen"] == 3
    assert [r["caller"] for r in build(world, kind="kto", versions=["v2"]).train] == ["bob"]
    assert build(world, kind="kto", since=late["created_at"]).dataset_ids == [late["id"]]



def test_already_trained_feedback_leaves_training_but_not_the_held_out_pairs(world):
    """trained_feedback_ids (the loop's train_on='new'): a training example made only from
    feedback the starting adapter was trained on is dropped; the split does not move, and the
    held-out pairs keep such feedback (the gate scores every version on all of it)."""
    for i in range(60):
        c = world.completion(f"wrong {i}", prompt=f"q{i}")
        world.feedback("correction", c, correction={"role": "assistant", "content": f"right {i}"})
    first = build(world, eval_percent=20)
    later = set()
    for i in range(60, 80):
        c = world.completion(f"wrong {i}", prompt=f"q{i}")
        later.add(world.feedback("correction", c, correction={"role": "assistant", "content": f"right {i}"})["id"])
    full = build(world, eval_percent=20)
    new = build(world, eval_percent=20, trained_feedback_ids=first.dataset_ids)
    assert new.eval == full.eval  # the gate's pairs: all of them, old ones included
    trained = {i for r in first.train for i in r["feedback_ids"]}
    assert trained and not trained & {i for r in new.train for i in r["feedback_ids"]}
    assert new.train == [r for r in full.train if not set(r["feedback_ids"]) <= set(first.dataset_ids)]
    assert 0 < len(new.train) < len(full.train)
    assert new.stats["dropped"]["already_trained"] == len(full.train) - len(new.train) == len(first.train)
    assert {i for r in new.train for i in r["feedback_ids"]} <= later
    with pytest.raises(ValueError):
        DatasetConfig(trained_feedback_ids="fb-0001")

# ---------------------------------------------------------------- output

def _mixed_world(world) -> None:
    a = world.completion({"role": "assistant", "content": None, "reasoning": "r1", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        prompt="tool?", tools=TOOLS, reasoning_effort="medium")
    b = world.completion({"role": "assistant", "content": "plain", "reasoning": "r2"}, prompt="tool?", tools=TOOLS,
                         reasoning_effort="medium")
    world.feedback("pairwise", chosen_id=a["id"], rejected_id=b["id"])
    world.thumbs(a, 1)
    world.thumbs(b, -1)
    c = world.completion({"role": "assistant", "content": "wrong", "reasoning_content": "r3"}, prompt="multi",
                         chat_template_kwargs={"enable_thinking": True})
    world.feedback("correction", c, correction={"role": "assistant", "content": "right", "reasoning_content": "r"})
    for i in range(40):
        world.rating(world.completion(f"r{i}", prompt=f"r{i}"), 5 if i % 3 else 1)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_jsonl_round_trip(world, tmp_path, kind):
    _mixed_world(world)
    out = build(world, kind=kind, eval_percent=30)
    assert out.train and out.eval
    files = out.to_jsonl(tmp_path / "ds")
    lines = files["train"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(out.train) and json.loads(lines[0]) == out.train[0]
    assert DatasetBuild.from_jsonl(tmp_path / "ds") == out


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_to_hf_gives_trl_ready_datasets(world, kind):
    from datasets import Dataset

    _mixed_world(world)
    out = build(world, kind=kind, eval_percent=0)
    ds = out.to_hf("train")
    assert isinstance(ds, Dataset) and len(ds) == len(out.train)
    trl_cols = {"dpo": {"prompt", "chosen", "rejected"}, "kto": {"prompt", "completion", "label"}}[kind]
    assert set(ds.column_names) == trl_cols | {"tools", "chat_template_kwargs", "source", "caller",
                                               "conversation_hash", "version", "feedback_ids", "graded"}
    with_tools = [r for r in ds if r["tools"] is not None]
    assert with_tools and json.loads(with_tools[0]["tools"]) == TOOLS  # TRL json-decodes string tools
    assert all(isinstance(r["chat_template_kwargs"], dict) for r in ds)  # TRL does **example[...]
    empty = out.to_hf("eval")
    assert isinstance(empty, Dataset) and len(empty) == 0 and trl_cols <= set(empty.column_names)
    with pytest.raises(ValueError):
        out.to_hf("test")


# ---------------------------------------------------------------- config and invariants

def test_template_kwargs_match_the_gateway():
    assert template_kwargs({"messages": []}) == {"enable_thinking": False}
    assert template_kwargs({"reasoning_effort": "none"}) == {"enable_thinking": False}
    assert template_kwargs({"reasoning_effort": "low"}) == {"enable_thinking": True}
    assert template_kwargs({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False, "k": 1}}) \
        == {"enable_thinking": False, "k": 1}


@pytest.mark.parametrize("bad", [
    {"kind": "sft"}, {"eval_percent": 101}, {"eval_percent": -1}, {"eval_percent": 5.5}, {"max_length": 0},
    {"max_per_caller": 0}, {"max_caller_fraction": 0}, {"max_caller_fraction": 1.5},
    {"rating_desirable_min": 3, "rating_undesirable_max": 3}, {"rating_desirable_min": 6},
    {"sources": ["rating"]}, {"sources": []}, {"sources": "pairwise"}, {"exclude_callers": "mallory"},
])
def test_config_is_checked(bad):
    with pytest.raises(ValueError):
        DatasetConfig(**bad)


def test_config_fields_have_help():
    assert all(f.metadata.get("help") for f in fields(DatasetConfig))
    assert DatasetConfig(kind="kto", sources=["rating"]).sources == ("rating",)


def test_import_pulls_in_no_fastapi_or_heavy_modules():
    code = ("import sys, agentloop.rl.datasets; bad = [m for m in ('fastapi', 'torch', 'vllm', 'datasets') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
