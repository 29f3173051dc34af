"""DPO on preference pairs: `DPOJobConfig` + `train_dpo`, a LoRA trained with TRL's DPOTrainer.

Owns: the DPO-specific config (loss type and its checks) and the mapping of
it onto `trl.DPOConfig`; everything shared (data, model, metrics, checks,
saving) is rl/common.py.

Rows: {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant
msg], "tools": [...] | None, "chat_template_kwargs": {...}?}; assistant
messages may carry `tool_calls` (arguments as JSON text or dict) and
`reasoning_content`.

Reference policy: DPO's reference must be the policy training starts from.
  * fresh LoRA: we pass a `peft_config`; TRL wraps the base and computes the
    reference with the adapter disabled -- the base, which a LoRA with B = 0
    equals exactly;
  * continuing the live adapter: we pass the `PeftModel` and no `ref_model`;
    TRL 1.16 then adds a frozen adapter "ref", a copy of "default", and
    computes reference log-probs through it (`use_adapter(model, "ref")`).
    So the reference is the live adapter, as it must be, at the cost of one
    extra LoRA in memory. (Disabling the adapter would measure against the
    bare base; merging the live adapter and training a new LoRA on top would
    give a delta the engine cannot serve against the base.) run_training
    checks that "ref" is unchanged afterwards and saves only "default".
Invariant: returns only after the adapter in cfg.output_dir changed and validated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from agentloop.rl.common import AfterTrain, LoraJobConfig, OnLog, TrainResult, _help, run_training

__all__ = ["DPOJobConfig", "train_dpo", "DPO_LOSSES"]

# The paired losses of trl.DPOConfig.loss_type that need no extra inputs.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm", "discopop")


@dataclass
class DPOJobConfig(LoraJobConfig):
    # Defaults measured on tool-call corrections (docs/benchmarks.md, "Learning from corrections"):
    # LoRA DPO on a few dozen pairs barely moves at 5e-5; 1e-3 with the NLL term below learned.
    learning_rate: float = _help("Peak AdamW learning rate (LoRA on a few dozen pairs wants ~1e-3).", 1e-3)
    per_device_train_batch_size: int = _help("Pairs per forward pass.", 2)
    num_train_epochs: float = _help("Passes over the data (when max_steps <= 0). One pass over a few dozen "
                                    "corrections moved nothing measurable; two did.", 2.0)
    loss_type: str = _help("DPO loss variant (trl.DPOConfig.loss_type); 'sigmoid' is the DPO paper's.",
                           "sigmoid", choices=list(DPO_LOSSES))
    label_smoothing: float = _help("Assumed probability that a preference label is flipped (cDPO/robust), "
                                   "in [0, 0.5).", 0.0)
    sft_weight: float = _help("Weight of an NLL term on the chosen answer added to the DPO loss (RPO; TRL's "
                              "'sft' loss). Plain DPO lowers the chosen answer's likelihood along with the "
                              "rejected one's; with corrections (a known-good answer) the NLL keeps it rising. "
                              "0 disables.", 1.0)
    share_prompt: bool = _help("Run each pair's prompt through the model once and score both answers on its "
                               "keys/values (rl/shared_prefix.py): the same loss and gradients as TRL's two "
                               "full sequences, ~2x less work when the prompt is long (tool schemas). False "
                               "uses TRL's forward as is.", True)
    prompt_gradient: bool = _help("With share_prompt: let gradients flow into the prompt's forward (exact DPO). "
                                  "False runs the prompt without gradients -- the LoRA then learns only through "
                                  "the answer tokens (the prompt's keys/values still come from the current "
                                  "weights): an approximation that skips the backward pass over the prompt.",
                                  True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DPOJobConfig: loss_type {self.loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOJobConfig: label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not self.prompt_gradient and not self.share_prompt:
            raise ValueError("DPOJobConfig: prompt_gradient=False needs share_prompt=True")
        if not 0.0 <= self.sft_weight <= 100.0:
            raise ValueError(f"DPOJobConfig: sft_weight must be in [0, 100], got {self.sft_weight}")


def train_dpo(cfg: DPOJobConfig, train_rows: list[dict], eval_rows: list[dict] | None = None, *,
              on_log: OnLog | None = None, after_train: AfterTrain | None = None) -> TrainResult:
    """Train a DPO LoRA on `train_rows`; `on_log(step, metrics)` is called once per optimizer step."""
    from trl import DPOConfig, DPOTrainer

    from agentloop.rl.shared_prefix import SharedPrefixDPOTrainer

    extra = {"loss_type": [cfg.loss_type], "label_smoothing": cfg.label_smoothing}
    if cfg.sft_weight > 0:
        extra.update(loss_type=[cfg.loss_type, "sft"], loss_weights=[1.0, cfg.sft_weight])
    trainer_cls = (functools.partial(SharedPrefixDPOTrainer, prompt_gradient=cfg.prompt_gradient)
                   if cfg.share_prompt else DPOTrainer)
    return run_training("dpo", cfg, trainer_cls, DPOConfig, extra, train_rows, eval_rows, on_log, after_train)
