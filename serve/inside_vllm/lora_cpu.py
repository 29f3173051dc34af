"""Correct and fast LoRA kernels for vLLM's CPU backend (a vLLM general plugin).

Loaded only inside vLLM processes (entry point `vllm.general_plugins`); the
gateway never imports this module, so torch stays out of the HTTP process.

vLLM's CPU punica wrapper computes every LoRA product with its PyTorch
reference ops (`vllm.lora.ops.torch_ops`), which have two defects:

- a token that belongs to no adapter carries the index -1, and the reference
  ops gather `weights[-1]` -- Python's last slot -- so a base-model request
  batched beside an adapter that sits in the last slot gets that adapter's
  weights (the "LoRA bleed" bug);
- they gather a private copy of the weights for every token and run a batched
  mat-vec (`einsum("bi,boi->bo")`), which makes a long prefill on a LoRA
  adapter several times slower than on the base model (measured here: 1448
  prompt tokens on SmolLM2-135M, 22.4 s on a zero adapter vs 3.0 s on base).

The replacements keep the reference ops' signatures and output semantics
(shrink assigns, expand assigns or adds, the same slicing and padding rules)
but group tokens by adapter and run one GEMM per adapter present in the batch;
tokens of no adapter get exactly zero. Invariant: for indices >= 0 the result
equals the reference ops' (tests/test_lora_kernels.py checks both, on random
batches); for index -1 the LoRA term is zero.

Set AGENTLOOP_LORA_CPU_KERNELS=0 to keep vLLM's own ops (for comparisons).
"""

from __future__ import annotations

import os

import torch


def _lora_product(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is `inputs[t] @ weights[indices[t]].T`, or 0 when indices[t] < 0."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    rows = x.shape[0]
    if indices.shape[0] != rows:
        # The reference einsum broadcasts a single row against many indices
        # (or one index against many rows); keep that behaviour.
        if rows == 1:
            x = x.expand(indices.shape[0], -1)
            rows = indices.shape[0]
        elif indices.shape[0] == 1:
            indices = indices.expand(rows)
        else:
            raise ValueError(f"LoRA op: {rows} input rows but {indices.shape[0]} indices")
    present = torch.unique(indices).tolist()
    live = [i for i in present if i >= 0]
    if len(present) == 1 and live:
        # One adapter for the whole batch (the common case): one GEMM, no copies.
        return x @ weights[live[0]].to(dtype).t()
    out = x.new_zeros(rows, weights.shape[1])
    for i in live:
        rows_i = (indices == i).nonzero().squeeze(1)
        out.index_copy_(0, rows_i, x.index_select(0, rows_i) @ weights[i].to(dtype).t())
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _lora_product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their output dimension differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def enabled() -> bool:
    return os.environ.get("AGENTLOOP_LORA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> None:
    """Swap the ops into the CPU punica wrapper's namespace (it imported them by
    name). Idempotent; a no-op when disabled or when vLLM has no CPU wrapper."""
    if not enabled():
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    for name in OPS:
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, globals()[name])
    punica_cpu._agentloop_kernels = True
