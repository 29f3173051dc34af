"""The engine's dtype from the hardware (rl/precision.py), one rule for serving and training.

Owns: `auto` is bf16 on a GPU or a CPU with avx512_bf16/amx_bf16 and fp32 elsewhere;
a setting overrides it in any usual spelling and a wrong one is refused at start;
the supervised engine is started with the chosen dtype (its logged command line), /health
says which and why, and the other dtype of this machine serves the same greedy answers
through the zero adapter (so a CI machine whose CPU picks the other one is covered here).
"""

from __future__ import annotations

import re
import signal

import httpx
import pydantic
import pytest

from agentloop.rl.precision import choose, cpu_flags, normalize
from agentloop.serve.engine.supervisor import vllm_argv
from agentloop.serve.settings import Settings
from tests.conftest import start_gateway, stop_gateway

INTEL_AMX = frozenset("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile".split())
AMD_EPYC = frozenset("fpu sse2 avx2 fma f16c".split())


def test_auto_follows_native_bf16():
    assert choose("auto", gpu=False, flags=INTEL_AMX).name == "bf16"
    assert choose("auto", gpu=False, flags=frozenset({"avx512_bf16"})).name == "bf16"
    amd = choose("auto", gpu=False, flags=AMD_EPYC)
    assert amd.name == "fp32" and amd.vllm_dtype == "float32" and "no native bf16" in amd.reason
    assert choose("auto", gpu=True, flags=AMD_EPYC).name == "bf16"
    assert "amx_bf16" in choose("auto", gpu=False, flags=INTEL_AMX).reason


def test_a_setting_overrides_auto():
    for spelling, want in [("bfloat16", "bf16"), ("BF16", "bf16"), ("float32", "fp32"), ("fp32", "fp32")]:
        p = choose(spelling, gpu=False, flags=AMD_EPYC if want == "bf16" else INTEL_AMX)
        assert p.name == want and p.reason == f"set to {want}"
    with pytest.raises(ValueError, match="auto, bf16"):
        normalize("float16")


def test_the_setting_is_checked_at_start(monkeypatch):
    monkeypatch.setenv("AGENTLOOP_ENGINE_DTYPE", "float32")
    assert Settings().engine_dtype == "fp32"
    with pytest.raises(pydantic.ValidationError, match="auto, bf16"):
        Settings(engine_dtype="int8")


def test_cpuinfo_flags_are_read_per_line():
    text = "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbugs\t\t: spectre\n"
    assert cpu_flags(text) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert cpu_flags("") == frozenset()


def test_the_engine_command_line_takes_the_dtype():
    argv = vllm_argv(model="/m", served_name="a-base", port=1, chat_template="/t", tool_parser="p",
                     reasoning_parser=None, max_model_len=None, max_lora_rank=16, max_loras=4, dtype="float32")
    assert argv[argv.index("--dtype") + 1] == "float32"


def _engine_dtype_in_log(home) -> str:
    """The --dtype of the engine's last start, from the command line the supervisor logs
    (vLLM's own INFO lines are not always there: its logging follows the environment)."""
    (log,) = home.glob("logs/engine-*.log")
    starts = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("=== agentloop: starting engine")]
    found = re.findall(r"--dtype (\w+)", starts[-1]) if starts else []
    assert found, "the engine's start line names no dtype"
    return found[-1]


def test_the_supervised_engine_runs_in_the_chosen_dtype(server):
    auto = choose("auto")
    h = httpx.get(f"{server.url}/health", timeout=10).json()
    assert h["engine_dtype"] == {"dtype": auto.vllm_dtype, "reason": auto.reason}
    assert _engine_dtype_in_log(server.home) == auto.vllm_dtype


def test_the_other_dtype_serves_the_same_answers(tiny_model, tmp_path):
    """This machine's auto dtype is what every other engine test runs; this one runs the other
    (fp32 on a CPU with native bf16, bf16 on one without), through the zero adapter as users get it."""
    other = "float32" if choose("auto").name == "bf16" else "bfloat16"
    proc, url, _ = start_gateway(tmp_path, tiny_model, extra=["--engine-dtype", other], timeout=300)
    try:
        h = httpx.get(f"{url}/health", timeout=10).json()
        assert h["engine_dtype"]["dtype"] == other and h["engine_dtype"]["reason"].startswith("set to")
        assert _engine_dtype_in_log(tmp_path) == other
        import json

        manifest = json.loads((tiny_model / "tiny_manifest.json").read_text())
        scripts = [s for s in manifest["scripts"] if s["id"] in ("greeting", "joke", "haiku")]
        assert scripts
        for s in scripts:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": "agentloop", "messages": s["messages"], "temperature": 0, "max_tokens": 40})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == s["expected"]["content"]
    finally:
        assert stop_gateway(proc) in (0, -signal.SIGTERM)
