"""serve/inside_vllm/lora_cpu.py against vLLM's reference CPU LoRA ops, on random batches.

For tokens of an adapter (index >= 0) the results must match the reference; for
tokens of no adapter (index -1) the LoRA term must be exactly zero, where the
reference reads the last adapter slot (the CPU "LoRA bleed" bug).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ref = pytest.importorskip("vllm.lora.ops.torch_ops")

from agentloop.serve.inside_vllm import lora_cpu as fast  # noqa: E402

pytestmark = pytest.mark.engine  # loads a real model or vLLM itself (README, "Tests")

SLOTS, R, IN, OUT = 4, 8, 48, 40


def batch(seed: int, indices: list[int], dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(indices), IN, generator=g).to(dtype)
    a = torch.randn(SLOTS, 1, R, IN, generator=g).to(dtype)
    b = torch.randn(SLOTS, 1, OUT, R, generator=g).to(dtype)
    return x, a, b, torch.tensor(indices, dtype=torch.long)


CASES = [[0] * 7, [2, 2, 1, 1, 1, 3], [3, -1, 0, -1, 3], [-1, -1, 2], [1]]


@pytest.mark.parametrize("indices", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_shrink_and_expand_match_the_reference_and_zero_for_no_adapter(indices, dtype):
    x, a, b, idx = batch(len(indices), indices, dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    mine, theirs = torch.zeros(len(indices), R), torch.zeros(len(indices), R)
    fast.bgmv_shrink(x, a, mine, idx, 0.5)
    ref.bgmv_shrink(x, a, theirs, idx, 0.5)
    on = idx >= 0
    torch.testing.assert_close(mine[on], theirs[on], **tol)
    assert torch.count_nonzero(mine[~on]) == 0
    if (~on).any() and (idx == SLOTS - 1).any():
        assert torch.count_nonzero(theirs[~on]) > 0  # the reference bug this module fixes

    h = torch.randn(len(indices), R).to(dtype)
    for add in (False, True):
        base = torch.randn(len(indices), OUT + 8).to(dtype)
        mine, theirs = base.clone(), base.clone()
        fast.bgmv_expand(h, b, mine, idx, add)
        ref.bgmv_expand(h, b, theirs, idx, add)
        torch.testing.assert_close(mine[on], theirs[on], **tol)
        expect_off = base[~on].clone()
        if not add:
            expect_off[:, :OUT] = 0
        torch.testing.assert_close(mine[~on], expect_off)
        mine, theirs = base.clone(), base.clone()
        fast.bgmv_expand_slice(h, b, mine, idx, 4, OUT, add)
        ref.bgmv_expand_slice(h, b, theirs, idx, 4, OUT, add)
        torch.testing.assert_close(mine[on], theirs[on], **tol)


def test_sequence_ops_explode_per_sequence_indices():
    seq_lens, per_seq = torch.tensor([3, 2, 4]), torch.tensor([1, -1, 0])
    x, a, b, _ = batch(7, [0] * 9)
    token_idx = torch.repeat_interleave(per_seq, seq_lens)
    want = torch.zeros(9, R)
    fast.bgmv_shrink(x, a, want, token_idx, 1.0)
    got = torch.zeros(9, R)
    fast.sgmv_shrink(x, a, got, None, seq_lens, per_seq, 3, 4, 9, 1.0)
    torch.testing.assert_close(got, want)
    assert torch.count_nonzero(got[3:5]) == 0  # the sequence of no adapter
    out = torch.zeros(9, OUT)
    fast.sgmv_expand(got, b, out, None, seq_lens, per_seq, 3, 4, 9, False)
    assert torch.count_nonzero(out[3:5]) == 0 and torch.count_nonzero(out[:3]) > 0


def test_register_patches_the_cpu_wrapper_and_can_be_disabled(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    saved = {n: getattr(punica_cpu, n) for n in fast.OPS}
    try:
        for n in fast.OPS:
            setattr(punica_cpu, n, getattr(ref, n))
        monkeypatch.setenv("AGENTLOOP_LORA_CPU_KERNELS", "0")
        fast.register()
        assert all(getattr(punica_cpu, n) is getattr(ref, n) for n in fast.OPS)
        monkeypatch.setenv("AGENTLOOP_LORA_CPU_KERNELS", "1")
        fast.register()
        assert all(getattr(punica_cpu, n) is getattr(fast, n) for n in fast.OPS)
    finally:
        for n, f in saved.items():
            setattr(punica_cpu, n, f)


# ---------------------------------------------------------------- the compiled path's ops

from agentloop.serve.inside_vllm import lora_compile  # noqa: E402

SLICES = [40, 16, 16]  # a q/k/v-like layer: three slices of one output


def per_token_reference(y0, x, a, b, idx, scale, slices):
    """y0 + (scale * x[t] @ A_i[slot].T) @ B_i[slot].T per slice, in fp32, for tokens with an adapter."""
    want = y0.float().clone()
    off = 0
    for a_i, b_i, size in zip(a, b, slices):
        for t, s in enumerate(idx):
            if s >= 0:
                want[t, off:off + size] += (scale * x[t].float() @ a_i[s, 0].float().t()) @ b_i[s, 0].float().t()
        off += size
    return want


@pytest.mark.parametrize("indices", CASES + [[-1] * 4], ids=[str(c) for c in CASES + [[-1] * 4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compiled_path_ops_match_the_per_token_product(indices, dtype):
    lora_compile._register_ops()
    g = torch.Generator().manual_seed(len(indices))
    n = len(indices)
    x = torch.randn(n, IN, generator=g).to(dtype)
    a = [torch.randn(SLOTS, 1, R, IN, generator=g).to(dtype) for _ in SLICES]
    b = [torch.randn(SLOTS, 1, size, R, generator=g).to(dtype) for size in SLICES]
    # vLLM's persistent index buffer is longer than the batch: the ops read the first rows.
    buf = torch.full((64,), SLOTS - 1, dtype=torch.long)
    buf[:n] = torch.tensor(indices)
    y0 = torch.randn(n, sum(SLICES)).to(dtype)
    want = per_token_reference(y0, x, a, b, indices, 0.5, SLICES)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.25, "rtol": 0.05}
    off = torch.tensor([s < 0 for s in indices])

    y = y0.clone()
    torch.ops.agentloop.lora_linear(y, x, a, b, buf, 0.5, SLICES)
    torch.testing.assert_close(y.float(), want, **tol)
    assert torch.equal(y[off], y0[off])  # no adapter: untouched, never the last slot's weights

    # The row-parallel layers' two halves, through one fp32 buffer as vLLM passes it.
    h = torch.full((len(SLICES), n, R), 7.0)
    torch.ops.agentloop.lora_shrink(h, x, a, buf, 0.5)
    assert torch.count_nonzero(h[:, off]) == 0
    for add in (True, False):
        y = y0.clone()
        torch.ops.agentloop.lora_expand(y, h, b, buf, SLICES, 0, add)
        expect = want if add else per_token_reference(torch.zeros_like(y0), x, a, b, indices, 0.5, SLICES)
        if not add:
            expect[off] = 0
        torch.testing.assert_close(y.float(), expect, **tol)


def test_the_plan_follows_writes_to_the_index_buffer():
    buf = torch.zeros(16, dtype=torch.long)
    assert lora_compile.plan(buf, 4) == ("one", 0)
    buf[:4] = -1  # the next step: vLLM copies the new mapping into the same buffer
    assert lora_compile.plan(buf, 4) == ("none", None)
    buf[:4] = torch.tensor([1, -1, 2, 1])
    kind, groups = lora_compile.plan(buf, 4)
    assert kind == "mixed" and [(s, rows.tolist()) for s, rows in groups] == [(1, [0, 3]), (2, [2])]
    assert lora_compile.plan(buf, 2)[0] == "mixed" and lora_compile.plan(buf, 1) == ("one", 1)


def test_compile_stays_on_with_lora_on_cpu_unless_turned_off(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    lora_compile.register()  # what the engine's plugin loading did (idempotent)
    wrapper = punica_cpu.PunicaWrapperCPU
    assert wrapper.add_lora_linear is lora_compile._add_lora_linear
    monkeypatch.setenv("AGENTLOOP_LORA_CPU_COMPILE", "0")
    assert not lora_compile.enabled()
    monkeypatch.setenv("AGENTLOOP_LORA_CPU_COMPILE", "1")
    monkeypatch.setenv("AGENTLOOP_LORA_CPU_KERNELS", "0")
    assert not lora_compile.enabled()  # the compiled path uses the GEMM kernels' grouping


def test_a_module_the_adapter_leaves_alone_is_skipped_and_noticed_when_loaded():
    lora_compile._register_ops()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, IN, generator=g)
    a = [torch.randn(SLOTS, 1, R, IN, generator=g) for _ in SLICES]
    b = [torch.randn(SLOTS, 1, size, R, generator=g) for size in SLICES]
    b[1][2].zero_()  # slot 2 adapts slices 0 and 2 only, as an adapter without that module
    buf = torch.full((8,), 2, dtype=torch.long)
    y0 = torch.randn(3, sum(SLICES))
    y = y0.clone()
    torch.ops.agentloop.lora_linear(y, x, a, b, buf, 1.0, SLICES)
    torch.testing.assert_close(y, per_token_reference(y0, x, a, b, [2, 2, 2], 1.0, SLICES))
    assert torch.equal(y[:, 40:56], y0[:, 40:56])
    b[1][2, 0].copy_(torch.ones(SLICES[1], R))  # another adapter loaded into the slot: in-place
    y = y0.clone()
    torch.ops.agentloop.lora_linear(y, x, a, b, buf, 1.0, SLICES)
    torch.testing.assert_close(y, per_token_reference(y0, x, a, b, [2, 2, 2], 1.0, SLICES))
