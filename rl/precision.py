"""The one rule for bf16 or fp32, shared by training and serving.

Training (rl/common.py: LoRA jobs) and serving (the supervised vLLM engine's `--dtype`)
decide alike: bf16 on a GPU and on CPUs that do bf16 matmuls in hardware (AVX512-BF16 or
AMX), fp32 everywhere else. Without those instructions bf16 is emulated: measured on an
AMD EPYC (AVX2 only), plain vLLM decodes ~3x fewer tokens per second at 8 streams in bf16
than in fp32 (docs/benchmarks.md), and training steps are slower too.

Invariant: pure Python, no torch (the gateway imports it); the reason string says which
flags or device decided, for /health and the start-up log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# The spellings a setting may use, to the one each side understands.
_ALIASES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32",
            "float": "fp32"}
VLLM_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware. Without them bf16 is emulated and slow."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, seen without torch (the gateway has none)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


@dataclass(frozen=True)
class Precision:
    name: str      # "bf16" or "fp32"
    reason: str    # why, in words, for /health and the log

    @property
    def vllm_dtype(self) -> str:
        return VLLM_DTYPE[self.name]


def normalize(setting: str) -> str:
    """'auto', 'bf16' or 'fp32' from any accepted spelling; ValueError otherwise."""
    try:
        return _ALIASES[setting.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"precision must be one of auto, bf16 (bfloat16), fp32 (float32); got {setting!r}") from None


def choose(setting: str = "auto", *, gpu: bool | None = None, flags: frozenset[str] | None = None) -> Precision:
    """The precision for `setting` on this machine (or on the one `gpu` and `flags` describe)."""
    wanted = normalize(setting)
    if wanted != "auto":
        return Precision(wanted, f"set to {wanted}")
    if gpu if gpu is not None else gpu_visible():
        return Precision("bf16", "auto: a GPU")
    flags = cpu_flags() if flags is None else flags
    native = sorted(NATIVE_BF16_FLAGS & flags)
    if native:
        return Precision("bf16", f"auto: the CPU has native bf16 ({', '.join(native)})")
    return Precision("fp32", "auto: the CPU has no native bf16 (no avx512_bf16 or amx_bf16), so bf16 would be emulated")
