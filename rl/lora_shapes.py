"""What a LoRA adapter for a Llama-family decoder looks like: its target modules and shapes.

One rule in one place: the zero adapter (rl/zero_adapter.py) is written with
these shapes, the registry (rl/registry.py) validates adapters against them, and a
new training LoRA (rl/common.py) adapts `DEFAULT_TARGET_MODULES` by default, so a
trained version always has what the base version has. Pure: reads config.json
values only.
"""

from __future__ import annotations

# The attention projections: what the zero adapter (v0000) and a new LoRA adapt.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection, from a model's config.json."""
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg.get("intermediate_size")
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    if inter:
        shapes.update({"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)})
    return shapes
