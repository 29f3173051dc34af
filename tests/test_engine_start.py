"""How the gateway starts a supervised engine (serve/engine/supervisor.py), without starting one.

Owns: the vLLM command line takes the model's own context unless one is set, and
asks for whitespace-free structured output; the reason an engine start failed is
read from its log (the last start only, the whole message of its last error).
The real start, and the boot that fails with that reason, are in
tests/test_context_and_json.py.
"""

from __future__ import annotations

import json

from agentloop.serve.engine.supervisor import CLOSE_THINKING, engine_failure, vllm_argv

ARGS = dict(model="/m", served_name="agentloop-base", port=1, chat_template="/t.jinja", tool_parser="p",
            reasoning_parser=None, max_lora_rank=16, max_loras=4)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_kv_cache_is_set_in_bytes_and_the_legacy_variable_cannot_override_it(monkeypatch):
    from agentloop.serve.engine.supervisor import vllm_env

    assert flag(vllm_argv(max_model_len=None, kv_cache_bytes=2**29, **ARGS), "--kv-cache-memory-bytes") == str(2**29)
    assert flag(vllm_argv(max_model_len=None, **ARGS), "--kv-cache-memory-bytes") is None  # a GPU sizes its own
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_env()


def test_the_context_is_the_models_unless_set():
    assert flag(vllm_argv(max_model_len=None, **ARGS), "--max-model-len") is None
    assert flag(vllm_argv(max_model_len=4096, **ARGS), "--max-model-len") == "4096"


def test_structured_output_has_no_free_whitespace():
    config = json.loads(flag(vllm_argv(max_model_len=None, **ARGS), "--structured-outputs-config"))
    # vLLM takes disable_any_whitespace only with a named xgrammar or guidance backend.
    assert config == {"backend": "xgrammar", "disable_any_whitespace": True}


def test_thinking_gets_the_templates_end_marker_and_the_closing_processor():
    argv = vllm_argv(max_model_len=None, **{**ARGS, "reasoning_parser": "agentloop_think"}, reasoning_end="\n</think>")
    assert json.loads(flag(argv, "--reasoning-config")) == {"reasoning_end_str": "\n</think>"}
    assert flag(argv, "--logits-processors") == CLOSE_THINKING
    plain = vllm_argv(max_model_len=None, **ARGS)  # a template without thinking: neither
    assert "--reasoning-config" not in plain and "--logits-processors" not in plain


def test_engine_failure_is_the_last_starts_last_error_with_its_message(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text(
        "\n=== agentloop: starting engine at Mon: python -m vllm\n"
        "ValueError: an old start's error\n"
        "\n=== agentloop: starting engine at Tue: python -m vllm\n"
        "INFO 12-07 loading model\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "ValueError: To serve at least one request with the models's max seq len (8192), (0.19 GiB KV cache\n"
        "  is needed, which is larger than the available KV cache memory (0.1 GiB).\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n")
    got = engine_failure(log)  # the root cause, not vLLM's "see above"
    assert got.startswith("ValueError: To serve at least one request") and got.endswith("(0.1 GiB).")
    assert "old start" not in got
    assert engine_failure(tmp_path / "missing.log").startswith("(no engine log")
