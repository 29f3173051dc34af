"""Starts, watches and stops a local vLLM OpenAI server as a subprocess.

Invariants:
- the engine binds to loopback only; clients reach it through the gateway;
- it runs in its own process group, so stopping kills the whole tree
  (vLLM forks an engine-core process) and nothing is left orphaned; on Linux
  it also gets SIGTERM if the gateway dies without cleaning up (PDEATHSIG);
- if it dies unexpectedly it is restarted with capped exponential back-off;
  `on_exit` lets the gateway mark it down at once (requests get 503 meanwhile).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("agentloop.supervisor")

_PR_SET_PDEATHSIG = 1
# Loaded by the engine, by name (this module never imports vllm).
CLOSE_THINKING = "agentloop.serve.inside_vllm.think_end:CloseThinking"


def _child_setup() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def vllm_argv(*, model: str, served_name: str, port: int, chat_template: str, tool_parser: str,
              reasoning_parser: str | None, max_model_len: int | None, max_lora_rank: int, max_loras: int,
              dtype: str = "bfloat16", reasoning_end: str | None = None, close_thinking: bool = True,
              kv_cache_bytes: int | None = None, extra: list[str] | None = None) -> list[str]:
    """The vLLM command line the gateway relies on (tools, reasoning, runtime LoRA,
    compact structured output). No max_model_len: vLLM takes the model's own."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--chat-template", chat_template,
        "--enable-auto-tool-choice",
        # OpenAI: tool_choice "none" means the model sees no tools and calls none.
        "--exclude-tools-when-tool-choice-none",
        "--tool-call-parser", tool_parser,
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank),
        "--max-loras", str(max_loras),
        # bfloat16 or float32, by the CPU (rl/precision.py): emulated bf16 is ~3x slower.
        "--dtype", dtype,
        # JSON that ends: response_format grammars (json_schema, json_object) allow no
        # whitespace between tokens, so a constrained answer stops when its value does
        # instead of running on in newlines to max_tokens. vLLM only takes the flag with
        # an explicit xgrammar or guidance backend; xgrammar is the one that also builds
        # the tool-call structural tags (whose arguments serve/inside_vllm/call_grammar.py
        # makes whitespace-free itself, as the flag does not reach tags).
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level", "warning",
    ]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if kv_cache_bytes:
        # In bytes, not VLLM_CPU_KVCACHE_SPACE's whole GiB: a small model needs far less.
        argv += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    if reasoning_parser:
        argv += ["--reasoning-parser", reasoning_parser]
        if reasoning_end:
            # What vLLM writes when a request's thinking_token_budget is spent: the
            # template's own end marker, so the answer follows as the model was trained.
            argv += ["--reasoning-config", json.dumps({"reasoning_end_str": reasoning_end})]
        if close_thinking:
            # A thinking turn that tries to end inside its thinking closes it and answers.
            argv += ["--logits-processors", CLOSE_THINKING]
    return argv + list(extra or [])


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    # vLLM's CPU platform applies this legacy variable over --kv-cache-memory-bytes: the
    # gateway's setting (vllm_argv's kv_cache_bytes) must be the one that holds.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


_START_MARK = b"=== agentloop: starting engine"


def engine_failure(log_path: Path, tail_bytes: int = 256 * 1024, limit: int = 1500) -> str:
    """Why the last engine start failed, from its log: the last exception line
    ("ValueError: To serve at least one request ... KV cache ...") with the lines
    that go on its message (a pydantic error puts the reason on the next one),
    else the last line. A "see root cause above" line points at the one to show."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            data = f.read()
    except OSError as e:
        return f"(no engine log: {e})"
    data = data[data.rfind(_START_MARK) + 1:] if _START_MARK in data else data
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if "Error: " in ln or "Exception: " in ln]
    # vLLM's front end ends with "Engine core initialization failed. See root cause above.":
    # the root cause is the one to show.
    starts = [i for i in starts if "root cause above" not in lines[i]] or starts
    if not starts:
        return (lines or ["(empty engine log)"])[-1][-limit:]
    message = []
    for ln in lines[starts[-1]:]:
        if message and (ln.startswith(("Traceback", "File ", "For further information")) or "INFO" in ln):
            break
        message.append(ln)
    return " ".join(message)[:limit]


class EngineProcess:
    """One supervised vLLM server process."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path,
                 on_exit: Callable[[int], None] | None = None, max_backoff: float = 30.0):
        self.argv = argv
        self.env = env
        self.log_path = Path(log_path)
        self.on_exit = on_exit
        self.max_backoff = max_backoff
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._spawned_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab", buffering=0)
        logf.write(f"\n=== agentloop: starting engine at {time.ctime()}: {' '.join(self.argv)}\n".encode())
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_child_setup if sys.platform == "linux" else None,
        )
        logf.close()  # the child holds its own descriptor
        self._spawned_at = time.monotonic()
        log.info("engine process %s started (log: %s)", self.proc.pid, self.log_path)

    async def start(self) -> None:
        self._stopping = False
        self.spawn()
        self._task = asyncio.create_task(self._watch(), name="engine-watch")

    async def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.proc is not None
            code = self.proc.poll()
            if code is None:
                await asyncio.sleep(0.5)
                continue
            if self._stopping:
                return
            # An engine that stayed up a while gets a fresh back-off.
            if time.monotonic() - self._spawned_at > 120:
                backoff = 1.0
            log.error("engine process %s exited with %s; restarting in %.0fs (see %s)",
                      self.proc.pid, code, backoff, self.log_path)
            if self.on_exit:
                self.on_exit(code)
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            self.spawn()
            self.restarts += 1
            backoff = min(backoff * 2, self.max_backoff)

    async def stop(self, timeout: float = 20.0) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await asyncio.to_thread(self.terminate, timeout)

    def terminate(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        self._stopping = True
        proc = self.proc
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if pgid is not None:
            # The group may still hold vLLM's engine-core child after the
            # parent exits; kill the whole group for good.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            log.error("engine process %s did not exit", proc.pid)
