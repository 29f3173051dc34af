"""DPO with each pair's prompt run once: `SharedPrefixDPOTrainer`, TRL's DPOTrainer with a cheaper forward.

Owns: the forward pass and loss of a DPO batch when the chosen and rejected answers of a pair
follow the same prompt (always, for our rows). TRL runs prompt+chosen and prompt+rejected as
two full sequences, so a long prompt (tool schemas: 300-600 tokens before a 30-token call) is
computed four times per pair (policy and reference, twice each). Here the prompt goes through
the model once, its keys/values are shared by the two answers, and only the answers' tokens
are run again; the LM head runs only where a log-prob is needed. The reference's log-probs of
a pair are computed once per run and reused in later epochs (the reference is frozen).

Invariant: the same loss, metrics and gradients as TRL's `_compute_loss` on the same batch --
the prompt's cache keeps its autograd graph, so gradients reach the LoRA through the prompt's
keys and values exactly as in the full-sequence forward (tested against TRL's own forward in
tests/test_rl_training.py). Anything this path does not implement (other loss types, weighting,
f-divergences, MoE aux losses, a reference that moves) goes to TRL's implementation unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from agentloop.rl.logprobs import pair_logps

__all__ = ["SharedPrefixDPOTrainer", "SHARED_LOSSES"]

SHARED_LOSSES = {"sigmoid", "hinge", "ipo", "sft"}


def _split_pairs(inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The batch [chosen_1..B, rejected_1..B] (right-padded, completion_mask marking answers) as
    (prompt, chosen, rejected) id tensors; None if a pair's two rows do not share their prompt."""
    ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    half = ids.size(0) // 2
    pairs = []
    for i in range(half):
        rows = []
        for r in (i, half + i):
            n = int(attn[r].sum())
            where = comp[r, :n].nonzero()
            start = int(where[0]) if len(where) else n
            rows.append((ids[r, :start], ids[r, start:n]))
        (p_c, chosen), (p_r, rejected) = rows
        if len(p_c) == 0 or not torch.equal(p_c, p_r):
            return None
        pairs.append((p_c, chosen, rejected))
    return pairs


class SharedPrefixDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss runs each pair's prompt once (see the module docstring)."""

    def __init__(self, *args: Any, prompt_gradient: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_gradient = prompt_gradient
        self._ref_cache: dict[bytes, tuple[float, float]] = {}
        self.shared_batches = 0  # batches this path computed (the rest went to TRL's)

    def _shared_ok(self, return_outputs: bool) -> bool:
        return (not return_outputs and not self.aux_loss_enabled and not self.use_weighting
                and self.ld_alpha is None and self.f_divergence_type == "reverse_kl"
                and set(self.loss_types) <= SHARED_LOSSES and not self.args.sync_ref_model
                # checkpointing turns the model's cache off in training: no keys/values to share
                and not self.args.gradient_checkpointing)

    def _reference_context(self):
        if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(self.model)):
            unwrapped = self.accelerator.unwrap_model(self.model)
            # New adapter: disabled adapters = the base; continued adapter: TRL's frozen copy "ref".
            name = "ref" if "ref" in unwrapped.peft_config else None
            return self.model, lambda: use_adapter(unwrapped, adapter_name=name)
        return self.ref_model, contextlib.nullcontext

    def _reference_logps(self, pairs, inputs, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of `pairs`, which are the batch's pairs at indices `keep`."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"][keep], inputs["ref_rejected_logps"][keep]
        ref_model, ctx = self._reference_context()
        out = []
        for prompt, chosen, rejected in pairs:
            key = b"|".join(t.cpu().numpy().tobytes() for t in (prompt, chosen, rejected))
            if key not in self._ref_cache:
                with torch.no_grad(), ctx():
                    lp, _ = pair_logps(ref_model, prompt, [chosen, rejected])
                self._ref_cache[key] = (float(lp[0].sum()), float(lp[1].sum()))
            out.append(self._ref_cache[key])
        t = torch.tensor(out, dtype=torch.float32, device=self.accelerator.device)
        return t[:, 0], t[:, 1]

    def _compute_loss(self, model, inputs, return_outputs):
        pairs = _split_pairs(inputs) if self._shared_ok(return_outputs) else None
        if pairs is None:
            return super()._compute_loss(model, inputs, return_outputs)
        self.shared_batches += 1
        mode = "train" if self.model.training else "eval"
        tok_c, tok_r, hit_c, nll_c = [], [], [], []
        for prompt, chosen, rejected in pairs:
            if torch.equal(chosen, rejected):
                # A positive-only row (rl/datasets.py `positives`): no preference, so no DPO term
                # and no reference; only the NLL term below learns from it.
                lp, top1 = pair_logps(model, prompt, [chosen], prompt_gradient=self.prompt_gradient)
                nll_c.append(lp[0])
                hit_c.append(top1[0])
                continue
            lp, top1 = pair_logps(model, prompt, [chosen, rejected], prompt_gradient=self.prompt_gradient)
            tok_c.append(lp[0])
            tok_r.append(lp[1])
            hit_c.append(top1[0])
            nll_c.append(lp[0])
        keep = [i for i, p in enumerate(pairs) if not torch.equal(p[1], p[2])]
        preferred = [pairs[i] for i in keep]
        if not preferred:
            return self._positive_only_loss(nll_c, hit_c, inputs, mode)
        chosen_logps = torch.stack([t.sum() for t in tok_c])
        rejected_logps = torch.stack([t.sum() for t in tok_r])
        ref_chosen, ref_rejected = self._reference_logps(preferred, inputs, keep)
        chosen_logratios = chosen_logps - ref_chosen
        rejected_logratios = rejected_logps - ref_rejected
        delta = chosen_logratios - rejected_logratios

        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                per_seq = -F.logsigmoid(self.beta * delta)
            elif loss_type == "hinge":
                per_seq = torch.relu(1 - self.beta * delta)
            elif loss_type == "ipo":  # TRL's length-normalised IPO
                n_c = torch.tensor([max(len(t), 1) for t in tok_c], device=delta.device)
                n_r = torch.tensor([max(len(t), 1) for t in tok_r], device=delta.device)
                per_seq = ((chosen_logratios / n_c - rejected_logratios / n_r) - 1 / (2 * self.beta)) ** 2
            else:  # "sft": mean NLL over every chosen token of the batch (positive-only rows too)
                per_seq = -torch.cat(nll_c).mean().expand(len(preferred))
            loss = loss + per_seq.mean() * weight

        self._count_tokens(inputs, hit_c, mode)
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        self._metrics[mode]["rewards/chosen"].append(chosen_rewards.mean().item())
        self._metrics[mode]["rewards/rejected"].append(rejected_rewards.mean().item())
        self._metrics[mode]["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        self._metrics[mode]["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(chosen_logps.detach().mean().item())
        self._metrics[mode]["logps/rejected"].append(rejected_logps.detach().mean().item())
        return loss

    def _count_tokens(self, inputs, hit_c, mode) -> None:
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        hits = torch.cat(hit_c)
        self._metrics[mode]["mean_token_accuracy"].append(float(hits.float().mean()) if len(hits) else 0.0)

    def _positive_only_loss(self, nll_c, hit_c, inputs, mode):
        """A batch of positive-only rows: the NLL term alone (zero without one: nothing to learn)."""
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                loss = loss - torch.cat(nll_c).mean() * weight
        if not torch.is_tensor(loss):  # no NLL term: a graph-connected zero keeps backward() valid
            loss = torch.cat(nll_c).sum() * 0.0
        self._count_tokens(inputs, hit_c, mode)
        return loss
