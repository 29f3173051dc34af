"""LoRA on vLLM's CPU backend without giving up torch.compile (a vLLM general plugin).

Loaded only inside vLLM processes, beside `lora_cpu` (whose ops still serve the paths this
module leaves alone: LoRA on the logits, and everything when compilation stays off).

Why: vLLM's CPU platform turns compilation off whenever LoRA is enabled
(`CpuPlatform.check_and_update_config`: `compilation_config.mode = NONE`), because its
CPU punica wrapper decides per step in Python (prefill or decode, any adapter at all)
and such branches would be frozen into a graph traced once. Eager execution costs
~30% of decode speed on this model even when no request uses an adapter
(docs/benchmarks.md, "Engine speed").

What this does instead:
- the wrapper's products become torch ops, opaque to the compiler, one call per LoRA
  layer and step (all slices at once): `agentloop::lora_linear`, which every LoRA linear
  layer calls (`add_lora_linear`), and `agentloop::lora_shrink` / `agentloop::lora_expand`
  for the fully sharded layers (`fully_sharded_loras`), which call the halves. They read
  the per-token adapter slots from the wrapper's persistent index buffer at run time,
  sliced to the rows they get, so nothing per-step is traced. They are registered the
  direct way (vLLM's `direct_register_custom_op`): `torch.library.custom_op` costs
  several times more per call (measured: a quarter of decode time at one call per slice);
- inside an op, the grouping of rows by adapter is worked out once per step (cached on
  the index buffer's version counter) instead of once per layer: a batch of no adapter
  costs nothing, a batch of one adapter one GEMM pair per adapted slice, a mixed batch one
  per adapter; a module the adapter leaves alone (zeros in its slot, cached on the
  weight's version counter) costs nothing; products run in the activations' dtype;
- the platform keeps the compilation mode it chose without LoRA.

Invariants: the ops compute the per-token LoRA product (tests/test_lora_kernels.py), tokens
of no adapter get exactly zero (no LoRA bleed), and a served adapter's log-probabilities
are PEFT's (tests/test_lora_served.py, beside base requests in the same batches). vLLM's
compile cache re-traces when this file changes (its AOT cache checks the traced sources).
Off with AGENTLOOP_LORA_CPU_COMPILE=0 (or with AGENTLOOP_LORA_CPU_KERNELS=0).
"""

from __future__ import annotations

import os

import torch

from agentloop.serve.inside_vllm import lora_cpu

# (data_ptr, version, rows) of the index buffer -> the plan for those rows.
_plan_key: tuple[int, int, int] | None = None
_plan: tuple[str, object] = ("none", None)


def plan(indices: torch.Tensor, rows: int) -> tuple[str, object]:
    """How the first `rows` tokens group by adapter slot: ("none", None), ("one", slot)
    or ("mixed", [(slot, row indices), ...]). Cached until the buffer is written again."""
    global _plan_key, _plan
    key = (indices.data_ptr(), indices._version, rows)
    if key == _plan_key:
        return _plan
    idx = indices[:rows]
    slots = torch.unique(idx).tolist()
    live = [s for s in slots if s >= 0]
    if not live:
        out: tuple[str, object] = ("none", None)
    elif len(slots) == 1:
        out = ("one", live[0])
    else:
        out = ("mixed", [(s, (idx == s).nonzero().squeeze(1)) for s in live])
    _plan_key, _plan = key, out
    return out


def groups(indices: torch.Tensor, rows: int) -> list[tuple[int, torch.Tensor | None]]:
    """The plan as (slot, its rows) pairs to loop over; rows None means all of them."""
    kind, how = plan(indices, rows)
    return [] if kind == "none" else [(how, None)] if kind == "one" else how


# (data_ptr, slot) of a stacked LoRA weight -> (its version, whether the slot has weights).
_active: dict[tuple[int, int], tuple[int, bool]] = {}


def active(w: torch.Tensor, slot: int) -> bool:
    """Does `slot` of the stacked weight `w` hold anything but zeros? A module the adapter
    does not adapt (vLLM wraps every linear layer) has zeros there: its products are skipped.
    Cached until the weight is written again (an adapter loaded into or out of a slot)."""
    key = (w.data_ptr(), slot)
    hit = _active.get(key)
    if hit is not None and hit[0] == w._version:
        return hit[1]
    on = bool(w[slot].any())
    _active[key] = (w._version, on)
    return on


def _weight(w: torch.Tensor, slot: int) -> torch.Tensor:
    return w[slot, 0] if w.dim() == 4 else w[slot]


def _shrink(out: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], indices: torch.Tensor,
            scale: float) -> None:
    """out[i, t, :r] = scale * x[t] @ lora_a[i][slot(t)].T; 0 for a token of no adapter."""
    rows = x.shape[0]
    todo = groups(indices, rows)
    for i, a in enumerate(lora_a):
        r = a.shape[-2]
        out[i, :rows, :r] = 0
        for slot, sel in todo:
            if not active(a, slot):
                continue
            xs = x if sel is None else x.index_select(0, sel)
            res = scale * (xs @ _weight(a, slot).t()).to(out.dtype)
            if sel is None:
                out[i, :rows, :r] = res
            else:
                out[i, :rows, :r].index_copy_(0, sel, res)


def _expand(y: torch.Tensor, h: torch.Tensor, lora_b: list[torch.Tensor], indices: torch.Tensor,
            slices: list[int], offset: int, add: bool) -> None:
    """y[t, slice i] (+)= h[i, t] @ lora_b[i][slot(t)].T; a token of no adapter adds 0."""
    rows = h.shape[1]
    todo = groups(indices, rows)
    for i, b in enumerate(lora_b):
        size = min(slices[i], b.shape[-2])
        target = y[:rows, offset:offset + size]
        if not add:
            target.zero_()
        for slot, sel in todo:
            if not active(b, slot):
                continue
            w = _weight(b, slot)[:size]
            if sel is None:
                target.add_(h[i, :rows].to(y.dtype) @ w.t())
            else:
                target.index_add_(0, sel, h[i].index_select(0, sel).to(y.dtype) @ w.t())
        offset += slices[i]


def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                indices: torch.Tensor, scale: float, slices: list[int]) -> None:
    """y += (scale * x @ A.T) @ B.T per slice and token, with each token's adapter, in the
    activations' dtype (no casts: vLLM's wrapper would make an fp32 buffer and cast both
    weights and activations into it on every call)."""
    rows = x.shape[0]
    todo = groups(indices, rows)  # empty when no token has an adapter (the common case while v0000 is live)
    offset = 0
    for a, b, size in zip(lora_a, lora_b, slices):
        for slot, sel in todo:
            if not (active(a, slot) and active(b, slot)):
                continue
            w_b = _weight(b, slot)[:size]
            if sel is None:
                y[:rows, offset:offset + w_b.shape[0]].add_(((x @ _weight(a, slot).t()) * scale) @ w_b.t())
            else:
                part = ((x.index_select(0, sel) @ _weight(a, slot).t()) * scale) @ w_b.t()
                y[:rows, offset:offset + w_b.shape[0]].index_add_(0, sel, part)
        offset += size


def _nothing(*args) -> None:
    return None


_lib = None


def _register_ops() -> None:
    global _lib
    if _lib is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    _lib = Library("agentloop", "FRAGMENT")  # alive as long as this module: the ops' lifetime
    for name, fn, mutates in (("lora_linear", lora_linear, ["y"]), ("lora_shrink", _shrink, ["out"]),
                              ("lora_expand", _expand, ["y"])):
        direct_register_custom_op(name, fn, mutates_args=mutates, fake_impl=_nothing, target_lib=_lib,
                                  dispatch_key="CPU")


def _add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kw):
    torch.ops.agentloop.lora_linear(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), list(lora_a_stacked),
                                    list(lora_b_stacked), self._token_lora_indices, scale, list(output_slices))


def _add_shrink(self, y, x, lora_a_stacked, scale, **kw):
    if isinstance(y, torch.Tensor) and y.dim() == 3:  # the fully sharded layers' one buffer
        torch.ops.agentloop.lora_shrink(y, x.view(-1, x.shape[-1]), list(lora_a_stacked),
                                        self._token_lora_indices, scale)
        return y
    return _original["add_shrink"](self, y, x, lora_a_stacked, scale, **kw)


def _add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kw):
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        torch.ops.agentloop.lora_expand(y.view(-1, y.shape[-1]), x, list(lora_b_stacked), self._token_lora_indices,
                                        list(output_slices), offset_start, add_inputs)
        return y
    return _original["add_expand"](self, y, x, lora_b_stacked, output_slices, offset_start, add_inputs, **kw)


_original: dict = {}


def enabled() -> bool:
    flag = os.environ.get("AGENTLOOP_LORA_CPU_COMPILE", "1").strip().lower()
    return lora_cpu.enabled() and flag not in ("0", "false", "no", "off")


def register() -> None:
    """Patch the CPU punica wrapper and the CPU platform's config hook. Idempotent."""
    if not enabled():
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        return
    wrapper = punica_cpu.PunicaWrapperCPU
    if getattr(wrapper, "_agentloop_compiled", False):
        return
    _register_ops()
    _original.update(add_shrink=wrapper.add_shrink, add_expand=wrapper.add_expand)
    wrapper.add_lora_linear = _add_lora_linear
    wrapper.add_shrink = _add_shrink
    wrapper.add_expand = _add_expand
    wrapper._agentloop_compiled = True
    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        # The platform's only LoRA rule there is "no compilation": hide LoRA from it.
        lora = vllm_config.lora_config
        object.__setattr__(vllm_config, "lora_config", None)
        try:
            original(cls, vllm_config)
        finally:
            object.__setattr__(vllm_config, "lora_config", lora)

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
