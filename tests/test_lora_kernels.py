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
