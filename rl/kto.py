"""KTO on unpaired feedback (thumbs up / down): `KTOJobConfig` + `train_kto` with TRL's KTOTrainer.

Owns: the KTO-specific config (desirable/undesirable weights, loss type,
batch size rule) and its mapping onto `trl.KTOConfig`; the rest is rl/common.py.

Rows: {"prompt": [messages], "completion": [assistant msg], "label": bool,
"tools": [...] | None, "chat_template_kwargs": {...}?}.

KTO's KL baseline is estimated inside each batch from mismatched pairs
(completion i+1 under prompt i), so a batch of one has no baseline: the
per-device batch must be > 1 (TRL refuses it too; we say so at config time).
Reference policy: as for DPO (see rl/dpo.py) -- the base for a fresh LoRA,
TRL's frozen "ref" copy of the adapter when continuing one.
Invariant: returns only after the adapter in cfg.output_dir changed and validated.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentloop.rl.common import (
    AfterTrain, LoraJobConfig, OnLog, TrainingError, TrainResult, _help, run_training,
)

__all__ = ["KTOJobConfig", "train_kto", "KTO_LOSSES"]

KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOJobConfig(LoraJobConfig):
    # The learning rate stays LoraJobConfig's 5e-5, unlike DPO's 1e-3: on tool-call corrections
    # (desirable correction, undesirable answer, one value apart) KTO at 1e-3 collapsed every
    # log-prob within 8 steps and 2e-4 gained 1 point (docs/benchmarks.md, session 9).
    per_device_train_batch_size: int = _help(
        "Examples per forward pass; must be > 1 (the KL baseline comes from mismatched pairs in the batch).", 2)
    desirable_weight: float = _help("Loss weight of label=True rows; raise it when they are the minority.", 1.0)
    undesirable_weight: float = _help("Loss weight of label=False rows; raise it when they are the minority.", 1.0)
    loss_type: str = _help("'kto' (paper) or 'apo_zero_unpaired'.", "kto", choices=list(KTO_LOSSES))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in KTO_LOSSES:
            raise ValueError(f"KTOJobConfig: loss_type {self.loss_type!r} is not one of {', '.join(KTO_LOSSES)}")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError("KTOJobConfig: per_device_train_batch_size must be > 1 for loss_type 'kto' "
                             "(its KL term is estimated from other rows of the same batch)")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("KTOJobConfig: desirable_weight and undesirable_weight must be > 0")


def train_kto(cfg: KTOJobConfig, train_rows: list[dict], eval_rows: list[dict] | None = None, *,
              on_log: OnLog | None = None, after_train: AfterTrain | None = None) -> TrainResult:
    """Train a KTO LoRA on labelled completions; `on_log(step, metrics)` once per optimizer step."""
    from trl import KTOConfig, KTOTrainer

    labels = {bool(r.get("label")) for r in train_rows}
    if cfg.loss_type == "kto" and len(labels) < 2:
        # With one class only, rewards/margins is never defined and the KL-anchored loss
        # just pushes every completion one way: refuse rather than train on it silently.
        raise TrainingError("KTO needs both desirable (label=true) and undesirable (label=false) rows")
    return run_training("kto", cfg, KTOTrainer, KTOConfig,
                        {"loss_type": cfg.loss_type, "desirable_weight": cfg.desirable_weight,
                         "undesirable_weight": cfg.undesirable_weight},
                        train_rows, eval_rows, on_log, after_train)
