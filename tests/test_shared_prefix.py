"""rl/shared_prefix.py: the prompt-once DPO forward gives TRL's loss, metrics and gradients.

One real TRL DPOTrainer on the tiny model (fp32, so the comparison is to float rounding),
batches of real rows (tool schemas, tool calls, thinking mode, a truncated answer); the same
batch through TRL's `_compute_loss` and ours, for a fresh LoRA (reference = adapters
disabled) and a continued one (reference = TRL's frozen "ref" copy, which we perturb first so
that policy and reference differ).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from agentloop.rl.common import build_dataset, load_tokenizer  # noqa: E402
from agentloop.rl.shared_prefix import SharedPrefixDPOTrainer  # noqa: E402
from tests.test_rl_training import STYLE_ROWS, TEMPLATE, TOOL_ROWS, WEATHER, say, user  # noqa: E402

pytestmark = pytest.mark.engine  # loads a real model or vLLM itself (README, "Tests")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def call(city: str) -> list[dict]:
    return say("", tool_calls=[{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": {"city": city}}}])


# Answers that share leading tokens: two calls differing in one argument, and an answer that
# is the start of the other (the shared part then stops one token short of the shorter one).
PREFIX_ROWS = [
    {"prompt": user("Weather in Paris?"), "tools": [WEATHER], "chosen": call("Paris"), "rejected": call("Lyon")},
    {"prompt": user("Can you help?"), "tools": None, "chosen": say("Sure. What should I check?"),
     "rejected": say("Sure.")},
]


def make_trainer(tiny_model, tmp_path, loss_type, max_length=320, continued=False, rows=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    tok = load_tokenizer(str(tiny_model), TEMPLATE)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM", init_lora_weights=False)  # non-zero B: policy != base
    peft_config = lora
    model = base
    if continued:
        src = get_peft_model(base, lora)
        src.save_pretrained(str(tmp_path / "parent"))
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(tmp_path / "parent"), is_trainable=True)
        peft_config = None
    weights = [1.0, 0.5] if len(loss_type) == 2 else None
    args = DPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=2, max_length=max_length, loss_type=loss_type,
                     loss_weights=weights, beta=0.2, disable_tqdm=True, gradient_checkpointing=False)
    ds = build_dataset(rows or (STYLE_ROWS[:2] + TOOL_ROWS + PREFIX_ROWS), "dpo", TEMPLATE)
    trainer = SharedPrefixDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                     peft_config=peft_config)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if continued:  # make the frozen reference differ from the trained "default"
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if ".default." in n:
                    p.add_(0.05 * torch.randn_like(p))
    return trainer, policy


def loss_and_grads(fn, trainer, policy, batch):
    trainer.model.train()
    policy.zero_grad(set_to_none=True)
    for m in trainer._metrics.values():
        m.clear()
    loss = fn(trainer, trainer.model, batch, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad and p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v and k not in ("num_tokens", "entropy")
               and not k.startswith("logits/")}
    return loss.item(), grads, metrics


@pytest.mark.parametrize("loss_type,continued,max_length", [
    (["sigmoid"], False, 320),
    (["sigmoid", "sft"], True, 320),
    (["ipo"], False, 320),
    (["hinge"], False, 272),  # cuts the tool answers: truncated completions are scored alike
])
def test_shared_prompt_forward_equals_trl(tiny_model, tmp_path, loss_type, continued, max_length):
    from trl import DPOTrainer

    trainer, policy = make_trainer(tiny_model, tmp_path, loss_type, max_length, continued)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for batch_rows in (rows[:2], rows[2:4], rows[4:]):
        batch = trainer.data_collator(batch_rows)
        ref_loss, ref_grads, ref_metrics = loss_and_grads(DPOTrainer._compute_loss, trainer, policy, batch)
        before = trainer.shared_batches
        loss, grads, metrics = loss_and_grads(SharedPrefixDPOTrainer._compute_loss, trainer, policy, batch)
        assert trainer.shared_batches == before + 1, "the shared path fell back to TRL's"
        assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
        assert ref_grads and grads.keys() == ref_grads.keys()
        for n in ref_grads:  # float rounding differs element-wise; compare per tensor
            err = float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12))
            assert err < 2e-3, f"{n}: relative gradient error {err:.2e}"
        assert any(float(g.abs().max()) > 0 for g in grads.values())
        for k, v in ref_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
        # Second time round the reference comes from the per-run cache: same loss.
        again, _, _ = loss_and_grads(SharedPrefixDPOTrainer._compute_loss, trainer, policy, batch)
        assert again == pytest.approx(loss, rel=1e-6)
    assert len(trainer._ref_cache) == len(rows)


def test_without_prompt_gradient_the_loss_is_exact_and_only_answers_train(tiny_model, tmp_path):
    """prompt_gradient=False: same loss as TRL (the forward is exact); the gradient is the part
    that flows through the answer tokens -- non-zero, and different from the full one."""
    from trl import DPOTrainer

    trainer, policy = make_trainer(tiny_model, tmp_path, ["sigmoid", "sft"])
    trainer.prompt_gradient = False
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2, 4)])  # the tool rows
    ref_loss, ref_grads, _ = loss_and_grads(DPOTrainer._compute_loss, trainer, policy, batch)
    loss, grads, _ = loss_and_grads(SharedPrefixDPOTrainer._compute_loss, trainer, policy, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert grads.keys() == ref_grads.keys() and any(float(g.abs().max()) > 0 for g in grads.values())
    total = sum(float((grads[n] - ref_grads[n]).norm()) for n in grads)
    assert total > 1e-3 * sum(float(g.norm()) for g in ref_grads.values())


def test_prompt_gradient_off_needs_the_shared_prompt(tiny_model, tmp_path):
    from agentloop.rl.dpo import DPOJobConfig

    with pytest.raises(ValueError, match="share_prompt"):
        DPOJobConfig(base_model=str(tiny_model), output_dir=str(tmp_path / "o"), share_prompt=False,
                     prompt_gradient=False)


def test_positive_only_rows_train_through_the_nll_term_alone(tiny_model, tmp_path):
    """A chosen == rejected row (rl/datasets.py `positives`) adds its answer to the NLL term and
    nothing else: loss and gradients equal TRL's DPO term on the real pair alone plus TRL's NLL
    term over both rows; a batch of positives alone trains by the NLL term only."""
    from trl import DPOTrainer

    positive = dict(TOOL_ROWS[0], rejected=TOOL_ROWS[0]["chosen"])
    trainer, policy = make_trainer(tiny_model, tmp_path, ["sigmoid", "sft"], rows=[PREFIX_ROWS[0], positive])
    pair_row, pos_row = trainer.train_dataset[0], trainer.train_dataset[1]
    mixed, pair_only = trainer.data_collator([pair_row, pos_row]), trainer.data_collator([pair_row])

    def trl(loss_types, weights, batch):
        trainer.loss_types, trainer.loss_weights = loss_types, weights
        try:
            return loss_and_grads(DPOTrainer._compute_loss, trainer, policy, batch)[:2]
        finally:
            trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 0.5]

    dpo_loss, dpo_grads = trl(["sigmoid"], [1.0], pair_only)
    nll_loss, nll_grads = trl(["sft"], [0.5], mixed)
    loss, grads, metrics = loss_and_grads(SharedPrefixDPOTrainer._compute_loss, trainer, policy, mixed)
    assert loss == pytest.approx(dpo_loss + nll_loss, rel=1e-4, abs=1e-5)
    for n in grads:
        want = dpo_grads[n] + nll_grads[n]
        err = float((grads[n] - want).norm() / want.norm().clamp_min(1e-12))
        assert err < 2e-3, f"{n}: relative gradient error {err:.2e}"
    assert metrics["rewards/accuracies"] in (0.0, 1.0)  # one real pair: the positive is not counted
    assert len(trainer._ref_cache) == 1  # no reference forward for the positive

    only_pos = trainer.data_collator([pos_row])
    nll_pos, nll_pos_grads = trl(["sft"], [0.5], only_pos)
    for prompt_gradient in (True, False):  # without it, the answer still trains through its own tokens
        trainer.prompt_gradient = prompt_gradient
        loss, grads, _ = loss_and_grads(SharedPrefixDPOTrainer._compute_loss, trainer, policy, only_pos)
        assert loss == pytest.approx(nll_pos, rel=1e-4, abs=1e-5)
        assert any(float(g.abs().max()) > 0 for g in grads.values())
    trainer.loss_types, trainer.loss_weights = ["sigmoid"], [1.0]  # no NLL term: nothing to learn
    loss, grads, _ = loss_and_grads(SharedPrefixDPOTrainer._compute_loss, trainer, policy, only_pos)
    assert loss == 0.0 and all(float(g.abs().max()) == 0 for g in grads.values())
