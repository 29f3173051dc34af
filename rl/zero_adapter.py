"""The zero-initialised LoRA adapter that stands for the base model.

It is the base version `v0000` in the registry: the adapter training starts from,
and the one the engines load when the gateway serves the base through an adapter
(`base_on_weights` off). Its B matrices are zero, so its output is exactly the base
model's. By default the base runs on the engines' bare weights instead, which costs
no LoRA time; that is safe beside adapter requests only because agentloop's CPU LoRA
kernels give no-adapter tokens exactly zero (vLLM's own CPU ops have a measured bug
where such a token gets the last adapter slot's weights: serve/inside_vllm/lora_cpu.py).

Invariant: written atomically (temp dir + rename); an existing adapter folder
is never modified. Only numpy + safetensors: no torch in the gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from agentloop.rl.lora_shapes import DEFAULT_TARGET_MODULES as TARGET_MODULES, projection_shapes

def write_zero_adapter(model_dir: Path, out_dir: Path, *, r: int = 8, alpha: int = 16, seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter for `model_dir` whose delta is exactly zero.

    A is random (as PEFT initialises it) so the adapter can also be the start
    of training; B is zero so its output equals the base model's.
    """
    out_dir = Path(out_dir)
    if (out_dir / "adapter_config.json").exists():
        return out_dir
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = projection_shapes(cfg)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(cfg["num_hidden_layers"]):
        for mod in TARGET_MODULES:
            fan_in, fan_out = shapes[mod]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            bound = 1.0 / np.sqrt(fan_in)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (r, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((fan_out, r), dtype=np.float32)
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        (tmp / "manifest.json").write_text(json.dumps({
            "version": out_dir.name,
            "parent": None,
            "base_model": str(model_dir),
            "status": "live",
            "reason": "zero-initialised adapter standing for the base model",
        }, indent=2))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process won the race and wrote the same thing.
            if not (out_dir / "adapter_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
