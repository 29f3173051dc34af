"""What DPO and KTO training share: config base, data, model loading, metrics, the post-training checks.

Owns: `LoraJobConfig` (fields common to both methods, validated in
`__post_init__`), turning feedback rows into a TRL conversational dataset,
loading base + LoRA (fresh or continued) and the tokenizer, the callback
forwarding TRL's logged metrics, and `run_training`, which drives a TRL
trainer and saves the adapter.

Invariants:
  * Training text is rendered with exactly the template text serving uses:
    the tokenizer's `chat_template` is `templates.registry.template_text(name)`
    and tools/kwargs reach TRL per row (its `tools` / `chat_template_kwargs`
    columns). Every row is checked to render identically after the round-trip
    through Arrow (which null-fills missing struct keys), and its rendered
    prompt must be a prefix of each rendered prompt+completion (the context
    serving generates in); rows that fail are refused, not silently bent.
  * A run returns only if it changed the adapter's weights and left the
    reference untouched, and the saved folder passes `rl.registry.validate_adapter`
    -- so the registry never receives a no-op or unservable adapter.
No fastapi, nothing from serve/http/app.py; torch & co are imported lazily so that
`rl.job` can report a bad spec without loading them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from agentloop.rl.lora_shapes import DEFAULT_TARGET_MODULES
from agentloop.rl.precision import choose
from agentloop.rl.registry import DEFAULT_MAX_RANK, validate_adapter

__all__ = [
    "LoraJobConfig", "TrainResult", "TrainingError", "OnLog", "AfterTrain",
    "normalize_message", "build_dataset", "load_tokenizer",
    "run_training",
]

OnLog = Callable[[int, dict], None]
AfterTrain = Callable[[Any, Any], dict]
DEFAULT_TARGETS = list(DEFAULT_TARGET_MODULES)  # what the zero adapter (v0000) targets
# TRL's summary log at the end of train(): kept as the run summary, not a step.
_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}


class TrainingError(RuntimeError):
    """A training run that must not produce a version (bad data, no effect, unusable output)."""


def _help(text: str, default: Any = None, **kw) -> Any:
    if callable(default):
        return field(default_factory=default, metadata={"help": text, **kw})
    return field(default=default, metadata={"help": text, **kw})


@dataclass
class LoraJobConfig:
    """Fields every preference method shares. Subclasses add their loss's own."""

    base_model: str = _help("Local folder of the base model (Hugging Face layout).")
    output_dir: str = _help("Fresh folder the finished adapter is saved into (must not exist or be empty).")
    init_adapter: str | None = _help(
        "Adapter folder to continue training from (the live version); None starts a new LoRA on the base.")
    template: str = _help("Chat template name (templates/registry.py); must be the one serving uses.",
                          "chatml-tools")
    lora_r: int = _help("Rank of a new LoRA (ignored when continuing: the parent's rank is kept).", 8)
    lora_alpha: int = _help("LoRA alpha of a new adapter.", 16)
    lora_dropout: float = _help("LoRA dropout of a new adapter.", 0.0)
    target_modules: list = _help("Modules a new LoRA adapts.", lambda: list(DEFAULT_TARGETS))
    max_rank: int = _help("Largest rank the engine serves (vLLM --max-lora-rank).", DEFAULT_MAX_RANK)
    learning_rate: float = _help("Peak AdamW learning rate (LoRA wants far more than full fine-tuning).", 5e-5)
    num_train_epochs: float = _help("Passes over the data (when max_steps <= 0).", 1.0)
    max_steps: int = _help("If > 0, the number of optimizer steps (overrides num_train_epochs).", -1)
    per_device_train_batch_size: int = _help("Examples per forward pass.", 1)
    gradient_accumulation_steps: int = _help("Forward passes per optimizer step.", 1)
    lr_scheduler_type: str = _help("transformers scheduler name.", "linear")
    warmup_steps: int = _help("Linear warmup steps.", 0)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", 1.0)
    beta: float = _help("Strength of the pull towards the reference policy (the starting adapter).", 0.1)
    max_length: int = _help("Max tokens of prompt+completion; longer ones are truncated, prompts that alone "
                            "reach it are dropped.", 1024)
    seed: int = _help("Seed of LoRA init and data order.", 42)
    device: str = _help("'auto' (CUDA if present), 'cpu' or 'cuda'.", "auto", choices=["auto", "cpu", "cuda"])
    precision: str = _help("'auto', 'fp32' or 'bf16' (bf16 autocast over fp32 weights on CPU; bf16 weights "
                           "on CUDA). auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
                           "else fp32.", "auto", choices=["auto", "fp32", "bf16"])
    # Measured (docs/benchmarks.md, session 6): -27% a DPO step, no accuracy lost; vLLM serves bf16 too.
    cpu_base_weights: str = _help("With bf16 on CPU: dtype of the frozen base weights. 'bf16' spares autocast "
                                  "re-casting every frozen weight in every forward (~27% a DPO step); 'fp32' "
                                  "keeps fp32 weights (and an fp32 residual stream).", "bf16",
                                  choices=["fp32", "bf16"])
    load_in_4bit: bool = _help("Load the base in 4-bit NF4 (QLoRA; CUDA + bitsandbytes only).", False)
    gradient_checkpointing: bool = _help("Recompute activations in backward (saves memory, ~20-30% slower).",
                                         False)
    num_threads: int | None = _help("torch intra-op threads (process-wide); None leaves torch's default.")

    def __post_init__(self) -> None:
        from agentloop.templates.registry import get_template

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {msg}")

        need(bool(self.base_model), "base_model is required")
        need(bool(self.output_dir), "output_dir is required")
        try:
            get_template(self.template)
        except KeyError as exc:
            raise ValueError(f"{type(self).__name__}: {exc.args[0]}") from None
        need(1 <= self.max_rank, f"max_rank must be >= 1, got {self.max_rank}")
        need(1 <= self.lora_r <= self.max_rank, f"lora_r must be in [1, {self.max_rank}], got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(bool(self.target_modules), "target_modules must name at least one module")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps > 0 or num_train_epochs > 0")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        need(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        need(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm > 0,
             "warmup_steps, weight_decay must be >= 0 and max_grad_norm > 0")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto/cpu/cuda, got {self.device!r}")
        need(self.precision in ("auto", "fp32", "bf16"), f"precision must be auto/fp32/bf16, got {self.precision!r}")
        need(self.num_threads is None or self.num_threads >= 1, "num_threads must be >= 1")
        need(self.cpu_base_weights in ("fp32", "bf16"), f"cpu_base_weights must be fp32/bf16, got {self.cpu_base_weights!r}")
        need(not (self.load_in_4bit and self.device == "cpu"), "load_in_4bit needs CUDA (bitsandbytes kernels)")

    @classmethod
    def from_dict(cls, d: dict) -> "LoraJobConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    output_dir: str
    method: str
    steps: int
    seconds: float                  # whole run: loading, data, training, saving
    train_seconds: float            # the optimizer loop alone
    seconds_per_step: float
    examples: int                   # training rows used
    dropped: int                    # rows TRL dropped: their prompt alone reaches max_length
    final_metrics: dict             # last step's metrics + TRL's summary (+ eval_* if eval rows were given)
    history: list                   # [{"step": n, "metrics": {...}}] per logged step
    changed_tensors: int            # adapter tensors that differ from the start
    precision: str
    device: str
    shared_prompt_batches: int = 0  # batches whose prompt ran once for both answers (rl/shared_prefix.py)
    after_train: dict | None = None  # what the run's `after_train` hook returned (the gate's scores)
    after_train_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- data

def normalize_message(msg: dict) -> dict:
    """One message as serving renders it, in a shape Arrow stores losslessly.

    - content parts are joined with newlines (as vLLM flattens them);
    - `reasoning` is accepted as an alias of `reasoning_content`;
    - tool call arguments become the JSON text `tojson` would print for the
      parsed object: vLLM parses OpenAI's argument strings into dicts (invalid
      JSON -> {}) before rendering, and the template prints a string verbatim
      but a dict through `tojson` -- a string also keeps Arrow from merging
      every call's argument keys into one null-filled struct.
    """
    if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant", "tool"):
        raise TrainingError(f"not a chat message (role system/user/assistant/tool): {str(msg)[:200]}")
    out: dict[str, Any] = {"role": msg["role"]}
    content = msg.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    elif content is not None and not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False)
    out["content"] = content
    reasoning = msg.get("reasoning_content", msg.get("reasoning"))
    if isinstance(reasoning, str):
        out["reasoning_content"] = reasoning
    if msg.get("tool_calls"):
        calls = []
        for tc in msg["tool_calls"]:
            fn = tc.get("function", tc)
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    args = {}
            if not isinstance(args, dict):
                args = {}
            calls.append({"id": tc.get("id"), "type": "function", "function": {
                "name": fn.get("name") or "", "arguments": json.dumps(args, ensure_ascii=False)}})
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if msg.get(key) is not None:
            out[key] = str(msg[key])
    return out


def _messages(value: Any, what: str, *, completion: bool) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise TrainingError(f"{what} must be a non-empty list of messages")
    msgs = [normalize_message(m) for m in value]
    if completion and msgs[0]["role"] != "assistant":
        raise TrainingError(f"{what} must start with an assistant message, got {msgs[0]['role']!r}")
    return msgs


def _render_row(template: str, row: dict, completion_key: str | None) -> str:
    """The row's text as serving renders it: the prompt with the generation prompt (key None),
    or the prompt followed by the completion under `completion_key`."""
    from agentloop.templates.registry import render

    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
    kwargs = dict(row.get("chat_template_kwargs") or {})
    if completion_key is None:
        return render(template, list(row["prompt"]), tools=tools, add_generation_prompt=True, **kwargs)
    return render(template, list(row["prompt"]) + list(row[completion_key]), tools=tools, **kwargs)


def build_dataset(rows: list[dict], kind: str, template: str):
    """Rows -> a `datasets.Dataset` in TRL's conversational format.

    kind "dpo": {prompt, chosen, rejected, tools?, chat_template_kwargs?};
    kind "kto": {prompt, completion, label: bool, tools?, chat_template_kwargs?}.
    `tools` is stored as JSON text (TRL json-decodes a string column), so each
    row keeps its own tool schemas instead of Arrow's merged, null-filled struct.
    """
    from datasets import Dataset

    if not rows:
        raise TrainingError("no training rows")
    keys = ("chosen", "rejected") if kind == "dpo" else ("completion",)
    norm: list[dict] = []
    for i, row in enumerate(rows):
        try:
            r: dict[str, Any] = {"prompt": _messages(row.get("prompt"), "prompt", completion=False)}
            for k in keys:
                r[k] = _messages(row.get(k), k, completion=True)
            if kind == "kto":
                if not isinstance(row.get("label"), bool):
                    raise TrainingError(f"label must be true or false, got {row.get('label')!r}")
                r["label"] = row["label"]
            tools = row.get("tools")
            if isinstance(tools, str):
                tools = json.loads(tools)
            if tools is not None and not isinstance(tools, list):
                raise TrainingError("tools must be a list of tool definitions or null")
            r["tools"] = json.dumps(tools, ensure_ascii=False) if tools else None
            kw = row.get("chat_template_kwargs") or {}
            if not isinstance(kw, dict):
                raise TrainingError("chat_template_kwargs must be an object")
            r["chat_template_kwargs"] = kw
            # Serving generates after the rendered prompt; if the prompt+completion text does
            # not start with it, TRL would train the completion after a different context (e.g.
            # thinking on, but a completion without reasoning_content drops the "<think>").
            prompt_text = _render_row(template, r, None)
            for k in keys:
                if not _render_row(template, r, k).startswith(prompt_text):
                    raise TrainingError(
                        f"{k}: the rendered prompt is not a prefix of the rendered prompt+{k}, so it cannot be "
                        "trained in the context serving generates it in (thinking mode needs a "
                        "reasoning_content on every completion)")
        except TrainingError as exc:
            raise TrainingError(f"row {i}: {exc}") from None
        norm.append(r)
    # TRL does **row["chat_template_kwargs"]: give every row every key (None = unset,
    # which our templates treat as absent), or drop the column when no row has any.
    kw_keys = sorted({k for r in norm for k in r["chat_template_kwargs"]})
    for r in norm:
        if kw_keys:
            r["chat_template_kwargs"] = {k: r["chat_template_kwargs"].get(k) for k in kw_keys}
        else:
            del r["chat_template_kwargs"]
    ds = Dataset.from_list(norm)
    # Arrow adds every key seen in any message to every message (as None). Prove
    # that changes nothing the model will see.
    for i, (orig, stored) in enumerate(zip(norm, ds)):
        for k in keys:
            if _render_row(template, orig, k) != _render_row(template, stored, k):
                raise TrainingError(f"row {i}: rendering changed after storing it in the dataset ({k})")
    return ds


# ---------------------------------------------------------------- model

def load_tokenizer(model_dir: str, template: str):
    from transformers import AutoTokenizer

    from agentloop.templates.registry import template_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    # The same Jinja text vLLM renders with: TRL tokenizes through tokenizer.apply_chat_template.
    tok.chat_template = template_text(template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_device_precision(cfg: LoraJobConfig) -> tuple[str, str]:
    import torch

    cuda = torch.cuda.is_available()
    device = cfg.device if cfg.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        raise TrainingError("device='cuda' but torch sees no CUDA device")
    # Measured on 2 shared cores with AVX512-BF16 (DPO, LoRA r=8, median s/step after the first):
    # SmolLM2-135M, 16 pairs: batch 1 bf16 1.16 vs fp32 1.59; batch 2 bf16 1.7-2.0 vs fp32 2.2-2.6.
    # The 6.6M-param tiny model is ~15% faster in fp32 (0.42 vs 0.49), but anything real gains.
    # The same rule as the serving engine's dtype (rl/precision.py).
    return device, choose(cfg.precision, gpu=device == "cuda").name


def load_policy(cfg: LoraJobConfig, device: str, precision: str):
    """(model, peft_config): a PeftModel continuing `init_adapter`, or the bare base plus a
    LoraConfig that TRL wraps (it then gets its reference by disabling the adapter)."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if cfg.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError("load_in_4bit needs the bitsandbytes package (pip install bitsandbytes)")
        if device != "cuda":
            raise TrainingError("load_in_4bit needs a CUDA device; bitsandbytes 4-bit training is CUDA-only here")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    # CUDA bf16: bf16 weights. CPU bf16: autocast does the bf16 math, over fp32 weights unless
    # cpu_base_weights says bf16; the LoRA stays fp32 either way (PEFT's autocast_adapter_dtype).
    bf16_weights = precision == "bf16" and (device == "cuda" or cfg.cpu_base_weights == "bf16")
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype, **kwargs)
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.init_adapter:
        validate_adapter(cfg.init_adapter, max_rank=cfg.max_rank, base_model_dir=cfg.base_model)
        # is_trainable=True is essential: the default (False) loads frozen LoRA weights and
        # training then "runs" with plausible metrics while nothing changes.
        model = PeftModel.from_pretrained(base, cfg.init_adapter, is_trainable=True)
        return model, None
    return base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def _lora_snapshot(model, adapter: str) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if f".{adapter}." in n}


# ---------------------------------------------------------------- driving TRL

def _metrics_callback(on_log: OnLog | None):
    from transformers import TrainerCallback

    class ForwardMetrics(TrainerCallback):
        """TRL logs loss, rewards/{chosen,rejected,margins,accuracies}, kl (KTO), ... once per
        logging step through Trainer.log; forward the numbers and keep the history."""

        def __init__(self) -> None:
            self.history: list[dict] = []
            self.summary: dict = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            nums = {k: float(v) for k, v in (logs or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if _SUMMARY_KEYS & nums.keys():
                self.summary.update(nums)
            elif any(k.startswith("eval_") for k in nums):
                pass  # returned by trainer.evaluate() into the final metrics
            elif nums:
                self.history.append({"step": state.global_step, "metrics": nums})
                if on_log is not None:
                    on_log(state.global_step, nums)

    return ForwardMetrics()


def run_training(method: str, cfg: LoraJobConfig, trainer_cls, config_cls, method_args: dict,
                 train_rows: list[dict], eval_rows: list[dict] | None, on_log: OnLog | None,
                 after_train: AfterTrain | None = None) -> TrainResult:
    """Build the TRL trainer for `method`, train, check the effect, save into cfg.output_dir.

    `after_train(model, tokenizer)` runs once the adapter is saved, on the trained PeftModel
    (adapter "default") in the run's precision, while the model is still loaded: the loop
    scores the gate's held-out pairs there instead of loading the model again."""
    import torch
    from transformers import PrinterCallback, ProgressCallback

    t0 = time.monotonic()
    out = Path(cfg.output_dir)
    if not (Path(cfg.base_model) / "config.json").is_file():
        raise TrainingError(f"base model folder {cfg.base_model} not found (no config.json); "
                            "training needs the model on local disk")
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"output_dir {out} is not empty")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    device, precision = resolve_device_precision(cfg)
    kind = "dpo" if method == "dpo" else "kto"
    train_ds = build_dataset(train_rows, kind, cfg.template)
    eval_ds = build_dataset(eval_rows, kind, cfg.template) if eval_rows else None
    tokenizer = load_tokenizer(cfg.base_model, cfg.template)
    model, peft_config = load_policy(cfg, device, precision)

    with tempfile.TemporaryDirectory(prefix="agentloop-trainer-") as scratch:
        args = config_cls(
            output_dir=scratch, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=1,
            use_cpu=device == "cpu", bf16=precision == "bf16", fp16=False,
            gradient_checkpointing=cfg.gradient_checkpointing, learning_rate=cfg.learning_rate,
            num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            per_device_eval_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr_scheduler_type=cfg.lr_scheduler_type,
            warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            beta=cfg.beta, max_length=cfg.max_length, seed=cfg.seed, data_seed=cfg.seed,
            dataloader_pin_memory=False, **method_args)
        callback = _metrics_callback(on_log)
        trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
        # PrinterCallback prints every log dict to stdout; rl.job's stdout is its event stream.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        examples = len(trainer.train_dataset)
        if examples == 0:
            raise TrainingError(f"no training rows left: every prompt is at least max_length={cfg.max_length} tokens")
        policy = trainer.accelerator.unwrap_model(trainer.model)
        before = _lora_snapshot(policy, "default")
        ref_before = _lora_snapshot(policy, "ref")  # TRL's frozen copy of a continued adapter
        trainable = sum(p.numel() for n, p in policy.named_parameters() if p.requires_grad and ".default." in n)
        if not before or trainable == 0:
            raise TrainingError("the adapter has no trainable weights (loaded with is_trainable=False?)")

        t_train = time.monotonic()
        trainer.train()
        train_seconds = time.monotonic() - t_train
        steps = trainer.state.global_step
        final = dict(callback.history[-1]["metrics"]) if callback.history else {}
        final.update(callback.summary)
        if eval_ds is not None:
            final.update(trainer.evaluate())

        after = _lora_snapshot(policy, "default")
        changed = sum(not torch.equal(before[n], after[n]) for n in before)
        if changed == 0:
            raise TrainingError(f"{steps} steps of {method} changed no adapter weights: nothing was trained")
        if any(not torch.equal(t, p) for t, p in zip(ref_before.values(), _lora_snapshot(policy, "ref").values())):
            raise TrainingError("the reference adapter changed during training; the run is invalid")

        out.mkdir(parents=True, exist_ok=True)
        # Only "default": TRL's "ref" adapter is a training-time copy, not part of the result.
        policy.save_pretrained(str(out), selected_adapters=["default"])
        with contextlib.suppress(OSError):
            (out / "README.md").unlink()  # PEFT's model-card stub
        scores, t_after = None, time.monotonic()
        if after_train is not None:
            with trainer.accelerator.autocast():
                scores = after_train(policy, tokenizer)
        after_seconds = time.monotonic() - t_after
    validate_adapter(out, max_rank=cfg.max_rank, base_model_dir=cfg.base_model)
    return TrainResult(
        output_dir=str(out), method=method, steps=steps, seconds=round(time.monotonic() - t0, 3),
        train_seconds=round(train_seconds, 3), seconds_per_step=round(train_seconds / max(steps, 1), 4),
        examples=examples, dropped=len(train_rows) - examples, final_metrics=final, history=callback.history,
        changed_tensors=changed, precision=precision, device=device,
        shared_prompt_batches=getattr(trainer, "shared_batches", 0), after_train=scores,
        after_train_seconds=round(after_seconds, 3))
