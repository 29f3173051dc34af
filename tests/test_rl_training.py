"""DPO/KTO LoRA training (rl/dpo.py, rl/kto.py, rl/common.py) and training jobs (rl/job.py) on the tiny model.

Small on purpose: a few steps on short sequences (max_length 320), 2 CPU cores
shared with other tests. What is asserted is real: adapter tensors change,
TRL's metrics arrive per step, the output loads with PEFT and passes the
registry, a clear preference widens the policy's chosen-vs-rejected log-prob
margin, continuing an adapter uses it as the DPO reference, and a killed job
leaves no version behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from agentloop.rl.common import TrainingError  # noqa: E402
from agentloop.rl.dpo import DPOJobConfig, train_dpo  # noqa: E402
from agentloop.rl.job import read_events, start_job  # noqa: E402
from agentloop.rl.kto import KTOJobConfig, train_kto  # noqa: E402
from agentloop.rl.logprobs import completion_logprob, preference_margins  # noqa: E402
from agentloop.rl.registry import AdapterRegistry  # noqa: E402
from agentloop.rl.zero_adapter import write_zero_adapter  # noqa: E402

pytestmark = pytest.mark.engine  # loads a real model or vLLM itself (README, "Tests")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEMPLATE = "chatml-tools"
CHOSEN, REJECTED = "Certainly! Tell me what you need.", "Sure. What should I check?"
STYLE_PROMPTS = ["Can you help me with something?", "Could you check something for me?",
                 "Please take a look at my question.", "I need a hand with a task."]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def say(text: str, **extra) -> list[dict]:
    return [{"role": "assistant", "content": text, **extra}]


STYLE_ROWS = [{"id": 100 + i, "prompt": user(p), "chosen": say(CHOSEN), "rejected": say(REJECTED), "tools": None}
              for i, p in enumerate(STYLE_PROMPTS)]
# Tool calls (arguments as a JSON string and as a dict), reasoning, thinking mode and
# per-row tool lists: the shapes real feedback has, all through the serving template.
TOOL_ROWS = [
    {"id": 200, "prompt": user("What is the weather in Paris?"), "tools": [WEATHER, CALC],
     "chosen": say("", tool_calls=[{"id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
     "rejected": say("I cannot check the weather.")},
    {"id": 201, "prompt": user("What is 12 times 7?"), "tools": [CALC],
     "chosen": say("", reasoning_content="I should use the calculator.",
                   tool_calls=[{"id": "call_2", "type": "function",
                                "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}]),
     "rejected": say("It is 82.", reasoning_content="I will guess."),
     "chat_template_kwargs": {"enable_thinking": True}},
]
# 320: a prompt with both tool schemas is ~260 tokens; shorter prompts are dropped by TRL.
SHORT = dict(max_length=320, per_device_train_batch_size=2, num_threads=2)


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def load_policy(model_dir: Path, adapter: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, str(adapter)).eval() if adapter else model


@pytest.fixture(scope="module")
def tok(tiny_model):
    from agentloop.rl.common import load_tokenizer

    return load_tokenizer(str(tiny_model), TEMPLATE)


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path_factory.mktemp("adapters") / "tiny")
    write_zero_adapter(tiny_model, reg.root / "v0000")
    return reg


@pytest.fixture(scope="module")
def fresh_dpo(tiny_model, tmp_path_factory):
    """One fresh-LoRA DPO run, shared by the tests that inspect it."""
    out = tmp_path_factory.mktemp("dpo-fresh") / "adapter"
    calls: list[tuple[int, dict]] = []
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(out), max_steps=6, learning_rate=2e-3,
                       sft_weight=0.0, **SHORT)  # plain DPO: test_sft_weight_* compares against it
    result = train_dpo(cfg, STYLE_ROWS + TOOL_ROWS, on_log=lambda step, m: calls.append((step, m)))
    print(f"\n[timing] tiny model DPO, batch 2, fresh LoRA r=8: {result.seconds_per_step:.3f} s/step "
          f"({result.steps} steps, {result.train_seconds:.1f} s training, {result.seconds:.1f} s total)")
    return result, calls


def test_dpo_fresh_trains_reports_and_commits(fresh_dpo, tiny_model, registry):
    result, calls = fresh_dpo
    assert result.steps == 6 and result.examples == len(STYLE_ROWS + TOOL_ROWS) and result.dropped == 0
    assert [s for s, _ in calls] == list(range(1, 7))  # on_log once per optimizer step
    assert result.shared_prompt_batches == 6  # every batch ran its prompts once (rl/shared_prefix.py)
    for _, m in calls:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= m.keys()
    assert calls[0][1]["rewards/margins"] == 0.0  # step 1: policy == reference (the base)
    assert result.history == [{"step": s, "metrics": m} for s, m in calls]
    assert result.final_metrics["train_loss"] > 0 and "loss" in result.final_metrics

    # Fresh LoRA starts with B == 0; training must have moved it.
    weights = lora_tensors(Path(result.output_dir))
    b = [t for k, t in weights.items() if "lora_B" in k]
    assert b and any(t.abs().max() > 0 for t in b) and result.changed_tensors > 0
    assert all(".ref." not in k for k in weights)  # TRL's reference adapter is not saved
    cfg = json.loads((Path(result.output_dir) / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    m = registry.commit(result.output_dir, parent="v0000", base_model=str(tiny_model), template=TEMPLATE,
                        dataset_ids=[r["id"] for r in STYLE_ROWS + TOOL_ROWS], metrics=result.final_metrics,
                        method="dpo")
    assert registry.verify(m.version).status == "candidate"


def test_dpo_widens_the_preference_margin(fresh_dpo, tiny_model, tok):
    """A clear preference (Certainly! over Sure.) must show up in the policy's log-probs."""
    result, _ = fresh_dpo
    before = preference_margins(load_policy(tiny_model), tok, TEMPLATE, STYLE_ROWS)
    after = preference_margins(load_policy(tiny_model, Path(result.output_dir)), tok, TEMPLATE, STYLE_ROWS)
    print(f"\n[margin] log p(chosen) - log p(rejected): before {[round(x, 2) for x in before]}, "
          f"after {[round(x, 2) for x in after]}")
    assert all(a > b + 0.5 for a, b in zip(after, before)), (before, after)


def test_sft_weight_keeps_the_chosen_answer_rising(fresh_dpo, tiny_model, tok, tmp_path):
    """Plain DPO may push log p(chosen) down with log p(rejected); the added NLL term
    (`sft_weight`, TRL's 'sft' loss) must leave the chosen answers likelier than the
    same run without it, and the preference must still be learned."""
    plain, _ = fresh_dpo
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(tmp_path / "adapter"), max_steps=6,
                       learning_rate=2e-3, sft_weight=1.0, **SHORT)
    rpo = train_dpo(cfg, STYLE_ROWS + TOOL_ROWS)

    def chosen_logp(adapter: Path) -> float:
        model = load_policy(tiny_model, adapter)
        return sum(completion_logprob(model, tok, TEMPLATE, r["prompt"], r["chosen"], r.get("tools"),
                                      r.get("chat_template_kwargs")) for r in STYLE_ROWS)

    with_sft, without = chosen_logp(Path(rpo.output_dir)), chosen_logp(Path(plain.output_dir))
    print(f"\n[sft_weight] sum log p(chosen): DPO {without:.2f}, DPO + NLL {with_sft:.2f}")
    assert with_sft > without + 0.5, (with_sft, without)
    margins = preference_margins(load_policy(tiny_model, Path(rpo.output_dir)), tok, TEMPLATE, STYLE_ROWS)
    before = preference_margins(load_policy(tiny_model), tok, TEMPLATE, STYLE_ROWS)
    assert all(a > b for a, b in zip(margins, before)), (before, margins)


def test_dpo_continues_from_the_zero_adapter(tiny_model, registry, tmp_path):
    start = registry.path("v0000")
    out = tmp_path / "adapter"
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(out), init_adapter=str(start), max_steps=3,
                       learning_rate=2e-3, **SHORT)
    result = train_dpo(cfg, STYLE_ROWS)
    before, after = lora_tensors(start), lora_tensors(out)
    assert before.keys() == after.keys()  # same modules, same rank: the parent's layout is kept
    assert all(before[k].shape == after[k].shape for k in before)
    assert all(torch.count_nonzero(before[k]) == 0 for k in before if "lora_B" in k)
    assert any(torch.count_nonzero(after[k]) > 0 for k in after if "lora_B" in k)
    assert sum(not torch.equal(before[k], after[k]) for k in before) == result.changed_tensors > 0
    assert {"loss", "rewards/margins"} <= result.final_metrics.keys()
    m = registry.commit(out, parent="v0000", base_model=str(tiny_model), template=TEMPLATE, method="dpo")
    assert registry.get(m.version).parent == "v0000"


def test_bf16_base_weights_on_cpu_train_an_fp32_lora(tiny_model, registry, tmp_path):
    """cpu_base_weights='bf16': the frozen base is loaded in bf16 (autocast skips re-casting it in
    every forward), the LoRA still trains and is saved in fp32, and the reference is still the
    starting adapter (zero rewards at step 1)."""
    out = tmp_path / "adapter"
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(out), init_adapter=str(registry.path("v0000")),
                       max_steps=3, learning_rate=2e-3, precision="bf16", cpu_base_weights="bf16",
                       **SHORT)
    result = train_dpo(cfg, STYLE_ROWS)
    after = lora_tensors(out)
    assert result.precision == "bf16" and result.changed_tensors > 0
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(torch.count_nonzero(after[k]) > 0 for k in after if "lora_B" in k)
    first = result.history[0]["metrics"]
    assert abs(first["rewards/margins"]) < 1e-4, first


def test_continued_dpo_uses_the_starting_adapter_as_reference(fresh_dpo, tiny_model, tok, tmp_path):
    """Continuing a trained (non-zero) adapter: if the reference were the bare base, step 1 would
    already show rewards = beta * (log pi_adapter - log pi_base) != 0. It must be exactly 0."""
    start = Path(fresh_dpo[0].output_dir)
    drift = [a - b for a, b in zip(preference_margins(load_policy(tiny_model, start), tok, TEMPLATE, STYLE_ROWS),
                                   preference_margins(load_policy(tiny_model), tok, TEMPLATE, STYLE_ROWS))]
    assert min(abs(d) for d in drift) > 0.5  # the starting adapter is far from the base
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(tmp_path / "adapter"), init_adapter=str(start),
                       max_steps=2, learning_rate=1e-3, **SHORT)
    result = train_dpo(cfg, STYLE_ROWS)
    first = result.history[0]["metrics"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-4, (key, first)
    assert result.changed_tensors > 0


def test_kto_trains_with_batch_two(tiny_model, registry, tmp_path):
    # Alternating labels: with the sequential sampler every batch of 2 holds one of each,
    # so KTO logs rewards for both sides (and their margin) every step.
    rows = []
    for i, p in enumerate(STYLE_PROMPTS):
        rows.append({"id": 300 + 2 * i, "prompt": user(p), "completion": say(CHOSEN), "label": True, "tools": None})
        rows.append({"id": 301 + 2 * i, "prompt": user(p), "completion": say(REJECTED), "label": False,
                     "tools": [WEATHER] if i % 2 else None})
    out = tmp_path / "adapter"
    steps: list[int] = []
    cfg = KTOJobConfig(base_model=str(tiny_model), output_dir=str(out), max_steps=3, learning_rate=2e-3, **SHORT)
    result = train_kto(cfg, rows, on_log=lambda s, m: steps.append(s))
    assert steps == [1, 2, 3] and result.steps == 3
    for h in result.history:
        assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= h["metrics"].keys()
    assert result.changed_tensors > 0
    assert any(t.abs().max() > 0 for k, t in lora_tensors(out).items() if "lora_B" in k)
    load_policy(tiny_model, out)  # loads with PEFT
    m = registry.commit(out, parent="v0000", base_model=str(tiny_model), template=TEMPLATE, method="kto")
    assert registry.verify(m.version).method == "kto"


def test_a_frozen_adapter_is_refused_not_silently_trained(tiny_model, registry, tmp_path, monkeypatch):
    """PeftModel.from_pretrained's default is_trainable=False trains nothing while metrics look fine."""
    import peft

    original = peft.PeftModel.from_pretrained.__func__
    monkeypatch.setattr(peft.PeftModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: original(cls, *a, **{**k, "is_trainable": False})))
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(tmp_path / "adapter"),
                       init_adapter=str(registry.path("v0000")), max_steps=1, **SHORT)
    with pytest.raises(TrainingError, match="no trainable weights"):
        train_dpo(cfg, STYLE_ROWS)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def _as_vllm_renders(messages: list[dict]) -> list[dict]:
    """vLLM parses OpenAI tool-call argument strings into dicts before rendering."""
    out = []
    for m in messages:
        m = json.loads(json.dumps(m))
        for tc in m.get("tool_calls") or []:
            if isinstance(tc["function"]["arguments"], str):
                tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
        out.append(m)
    return out


def test_training_text_is_the_serving_text(tok):
    """What TRL renders (tokenizer.apply_chat_template on the stored dataset row, with its
    tools and chat_template_kwargs columns) is byte-identical to what serving renders."""
    from agentloop.rl.common import build_dataset
    from agentloop.templates.registry import render

    ds = build_dataset(STYLE_ROWS + TOOL_ROWS, "dpo", TEMPLATE)
    texts = []
    for row, stored in zip(STYLE_ROWS + TOOL_ROWS, ds):
        tools = json.loads(stored["tools"]) if stored["tools"] else None
        kw = stored.get("chat_template_kwargs") or {}
        for key in ("chosen", "rejected"):
            trl_text = tok.apply_chat_template(stored["prompt"] + stored[key], tools=tools, tokenize=False, **kw)
            serving = render(TEMPLATE, _as_vllm_renders(row["prompt"] + row[key]), tools=row["tools"],
                             **(row.get("chat_template_kwargs") or {}))
            assert trl_text == serving
            texts.append(trl_text)
    calc_chosen = texts[-2]
    assert '<think>\nI should use the calculator.\n</think>\n\n<tool_call>\n{"name": "calculator", ' \
           '"arguments": {"expression": "12*7"}}\n</tool_call><|im_end|>' in calc_chosen
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in texts[-4]
    assert '"name": "calculator"' in texts[-4] and '"name": "get_weather"' not in calc_chosen  # per-row tools


@pytest.mark.parametrize("row, kind, message", [
    ({"prompt": user("2+2?"), "chosen": say("4"), "rejected": say("5"),
      "chat_template_kwargs": {"enable_thinking": True}}, "dpo", "not a prefix"),
    ({"prompt": user("hi"), "chosen": say("a"), "rejected": user("b")}, "dpo", "must start with an assistant"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": say("a"), "rejected": say("b")}, "dpo", "role"),
    ({"prompt": user("hi"), "completion": say("a"), "label": "yes"}, "kto", "label must be true or false"),
    ({"prompt": user("hi"), "completion": say("a"), "label": True, "tools": {"x": 1}}, "kto", "tools must be"),
])
def test_bad_rows_are_refused(row, kind, message):
    from agentloop.rl.common import build_dataset

    with pytest.raises(TrainingError, match=message):
        build_dataset([row], kind, TEMPLATE)


@pytest.mark.parametrize("cls, kwargs, message", [
    (KTOJobConfig, {"per_device_train_batch_size": 1}, "must be > 1"),
    (DPOJobConfig, {"learning_rate": 0.0}, "learning_rate must be > 0"),
    (DPOJobConfig, {"beta": -0.1}, "beta must be > 0"),
    (DPOJobConfig, {"lora_r": 32}, r"lora_r must be in \[1, 16\]"),
    (DPOJobConfig, {"template": "nope"}, "unknown chat template"),
    (DPOJobConfig, {"loss_type": "sft"}, "loss_type"),
    (DPOJobConfig, {"sft_weight": -1}, "sft_weight"),
    (KTOJobConfig, {"desirable_weight": 0}, "must be > 0"),
    (DPOJobConfig, {"device": "cpu", "load_in_4bit": True}, "load_in_4bit needs CUDA"),
    (DPOJobConfig, {"cpu_base_weights": "int8"}, "cpu_base_weights"),
])
def test_configs_are_checked(cls, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cls(base_model="/m", output_dir=str(tmp_path / "o"), **kwargs)
    with pytest.raises(ValueError, match="unknown field"):
        cls.from_dict({"base_model": "/m", "output_dir": "/o", "lr": 1e-4})


def test_4bit_without_cuda_or_bitsandbytes_is_a_clear_error(tiny_model, tmp_path):
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this host can really train in 4-bit")
    cfg = DPOJobConfig(base_model=str(tiny_model), output_dir=str(tmp_path / "o"), load_in_4bit=True, **SHORT)
    with pytest.raises(TrainingError, match="bitsandbytes|CUDA"):
        train_dpo(cfg, STYLE_ROWS)


# ---------------------------------------------------------------- jobs

def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_spec(tiny_model, reg: AdapterRegistry, data: Path, **config) -> dict:
    return {"method": "dpo", "registry": str(reg.root), "base_model": str(tiny_model), "dataset": str(data),
            "parent": "live", "template": TEMPLATE,
            "config": {"max_length": 320, "per_device_train_batch_size": 2, "learning_rate": 1e-3, **config}}


@pytest.fixture
def job_registry(tiny_model, tmp_path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "adapters" / "tiny")
    write_zero_adapter(tiny_model, reg.root / "v0000")
    return reg


def test_job_commits_a_candidate_on_success(tiny_model, job_registry, tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", STYLE_ROWS + TOOL_ROWS)
    proc = start_job(job_spec(tiny_model, job_registry, data, max_steps=2), log_path=tmp_path / "job.log")
    events = list(read_events(proc))
    assert proc.returncode == 0, (events, (tmp_path / "job.log").read_text()[-3000:])
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "step", "step", "done"], events
    assert events[0]["parent"] == "v0000" and [e["step"] for e in events[1:3]] == [1, 2]
    assert "loss" in events[1]["metrics"] and "rewards/margins" in events[2]["metrics"]
    done = events[-1]
    assert done["version"] == "v0001"
    m = job_registry.get("v0001")
    assert (m.status, m.parent, m.method, m.template) == ("candidate", "v0000", "dpo", TEMPLATE)
    assert m.dataset_ids == [r["id"] for r in STYLE_ROWS + TOOL_ROWS]
    assert m.metrics["steps"] == 2 and "loss" in m.metrics and "rewards/margins" in m.metrics
    assert job_registry.verify("v0001").weights_sha256 == done["manifest"]["weights_sha256"]
    assert list(job_registry.root.glob(".tmp-*")) == []


def test_job_scores_the_gate_pairs_as_the_standalone_gate_does(fresh_dpo, tiny_model, job_registry, tmp_path):
    """The loop's gate takes its preference numbers from the training job (the model is loaded
    there already); they must be what scoring the saved adapters from scratch gives."""
    from agentloop.rl.gate import preference_accuracy

    data = write_rows(tmp_path / "pairs.jsonl", STYLE_ROWS + TOOL_ROWS)
    held = [{**r, "caller": f"key{i % 2}"} for i, r in enumerate(STYLE_ROWS + TOOL_ROWS)]
    gate_rows = write_rows(tmp_path / "gate.jsonl", held)
    live = fresh_dpo[0].output_dir  # any adapter other than the parent: the job must load it
    spec = {**job_spec(tiny_model, job_registry, data, max_steps=2, precision="fp32"),
            "gate": {"rows": str(gate_rows), "live": live}}
    events = list(read_events(proc := start_job(spec, log_path=tmp_path / "job.log")))
    assert proc.returncode == 0, (events, (tmp_path / "job.log").read_text()[-3000:])
    done = events[-1]
    in_job = done["result"]["gate_preference"]
    assert done["result"]["gate_seconds"] > 0
    fresh = preference_accuracy(str(tiny_model), TEMPLATE, held,
                                {"live": live, "candidate": str(job_registry.path(done["version"]))})
    for name in ("live", "candidate"):
        assert in_job[name]["n"] == len(held) and in_job[name]["callers"] == 2
        assert in_job[name]["accuracy"] == fresh[name]["accuracy"], (in_job, fresh)
        assert in_job[name]["mean_margin"] == pytest.approx(fresh[name]["mean_margin"], rel=1e-3, abs=1e-4)
    # fresh_dpo learned the style preference: its margins against the base are far from 0.
    assert in_job["live"]["mean_margin"] > 0.5
    assert preference_accuracy(str(tiny_model), TEMPLATE, held, {"live": None})["live"]["mean_margin"] == 0.0


def test_job_reports_a_bad_spec_and_commits_nothing(tiny_model, job_registry, tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", STYLE_ROWS)
    spec = {**job_spec(tiny_model, job_registry, data), "method": "kto"}
    spec["config"]["per_device_train_batch_size"] = 1
    events = list(read_events(proc := start_job(spec, log_path=tmp_path / "job.log")))
    assert proc.returncode == 1
    assert events[-1]["event"] == "failed" and "must be > 1" in events[-1]["error"]
    assert [m.version for m in job_registry.list()] == ["v0000"] and list(job_registry.root.glob(".tmp-*")) == []


def _start_and_wait_for_a_step(tiny_model, reg, tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", STYLE_ROWS * 4)
    proc = start_job(job_spec(tiny_model, reg, data, max_steps=500), log_path=tmp_path / "job.log")
    events = read_events(proc)
    seen = []
    deadline = time.monotonic() + 300
    for event in events:
        seen.append(event)
        if event["event"] == "step" or time.monotonic() > deadline:
            break
    assert seen[-1]["event"] == "step", (seen, (tmp_path / "job.log").read_text()[-3000:])
    return proc, events


def test_killed_job_leaves_no_version(tiny_model, job_registry, tmp_path):
    proc, events = _start_and_wait_for_a_step(tiny_model, job_registry, tmp_path)
    leftovers = list(job_registry.root.glob(".tmp-train-*"))
    assert len(leftovers) == 1  # its work in progress, inside the registry root
    os.kill(proc.pid, signal.SIGKILL)
    rest = list(events)
    assert proc.returncode == -signal.SIGKILL
    assert rest[-1]["event"] == "failed" and "without reporting a result" in rest[-1]["error"]
    assert [m.version for m in job_registry.list()] == ["v0000"]
    assert job_registry.next_version() == "v0001"
    assert job_registry.gc() == leftovers and list(job_registry.root.glob(".tmp-*")) == []


def test_terminated_job_cleans_up_and_says_so(tiny_model, job_registry, tmp_path):
    proc, events = _start_and_wait_for_a_step(tiny_model, job_registry, tmp_path)
    proc.terminate()
    rest = list(events)
    assert proc.returncode == 128 + signal.SIGTERM
    assert rest[-1] == {"event": "failed", "error": "terminated by SIGTERM"}
    assert [m.version for m in job_registry.list()] == ["v0000"]
    assert list(job_registry.root.glob(".tmp-*")) == []  # it removed its own work
