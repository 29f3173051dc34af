"""Bringing engines up: the model folder, the base adapter, the vLLM process.

Two modes. Supervised (default): make sure the model is on disk (the embedded
default is unpacked and converted by `python -m agentloop.serve.engine.default_model` in a
subprocess, so the gateway never imports torch), write the zero adapter that
stands for the base model, then start and watch a loopback vLLM server.
Attached (`--engine-url`, repeatable): vLLM servers already run; we only learn
their base model, write the zero adapter, and load it into each.

Invariant: the gateway answers /health from the first moment; until this
finishes requests get 503 + Retry-After, and `state` says what is going on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sys
from pathlib import Path

import httpx

from agentloop.rl.precision import Precision, choose, gpu_visible
from agentloop.rl.versions import BASE_VERSION
from agentloop.rl.zero_adapter import write_zero_adapter
from agentloop.serve.engine.adapters import AdapterManager
from agentloop.serve.engine.client import Engine, EnginePool, HttpEngine, Reverify
from agentloop.serve.engine.router import ServedVersions
from agentloop.serve.engine.supervisor import EngineProcess, engine_failure, vllm_argv, vllm_env
from agentloop.serve.settings import Settings
from agentloop.templates.registry import get_template

log = logging.getLogger("agentloop.boot")


def model_slug(model: str) -> str:
    """A folder name for a model's adapters: readable, and unique per source."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name or model)[:40]
    return f"{tail}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def http_engines(settings: Settings, router: ServedVersions, reverify: Reverify) -> list[Engine]:
    """The engines a gateway reaches: `--engine-url`s, or the one it supervises on loopback."""
    urls = settings.engine_urls or [f"http://127.0.0.1:{settings.engine_port}"]
    return [HttpEngine(u, adapters=router.adapters, base_names=router.base_names,
                       request_timeout=settings.request_timeout, health_interval=settings.health_interval,
                       reverify=reverify) for u in urls]


class Boot:
    """Brings the pool's engines up and binds the adapter manager to the base model's registry."""

    def __init__(self, settings: Settings, pool: EnginePool, adapters: AdapterManager):
        self.settings = settings
        self.pool = pool
        self.adapters = adapters
        self.state = "pending"
        self.process: EngineProcess | None = None
        self.precision: Precision | None = None  # chosen for a supervised engine; attached ones chose their own

    async def run(self) -> None:
        try:
            if self.settings.engine_urls:
                await self._attach()
            else:
                await self._supervise()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.state = f"failed: {type(e).__name__}: {e}"
            log.exception("engine boot failed")

    async def _supervise(self) -> None:
        s = self.settings
        self.state = "preparing model"
        model = await self._model_dir()
        self.state = "writing base adapter"
        self._add_base_adapter(model, Path(model) / "config.json")
        tpl = get_template(s.template)
        self.precision = choose(s.engine_dtype)
        log.info("engine dtype %s (%s)", self.precision.vllm_dtype, self.precision.reason)
        argv = vllm_argv(
            model=model, served_name=f"{s.alias}-base", port=s.engine_port, chat_template=str(tpl.path),
            tool_parser=tpl.tool_parser, reasoning_parser=tpl.reasoning_parser, reasoning_end=tpl.reasoning_end,
            max_model_len=s.max_model_len, max_lora_rank=s.max_lora_rank, max_loras=s.max_loras,
            dtype=self.precision.vllm_dtype, close_thinking=s.thinking_close, extra=s.engine_extra_args,
            kv_cache_bytes=None if gpu_visible() else int(s.kvcache_space_gib * 2**30),
        )
        self.process = EngineProcess(argv, vllm_env(),
                                     s.home / "logs" / f"engine-{s.engine_port}.log",
                                     on_exit=lambda code: self.pool.engines[0].mark_down(f"process exited ({code})"))
        self.state = "starting engine"
        await self.process.start()
        if await self._first_ready(s.engine_startup_timeout):
            self.state = "running"
        else:
            self.state = f"engine not ready after {s.engine_startup_timeout:.0f}s (see {self.process.log_path})"

    async def _first_ready(self, timeout: float) -> bool:
        """Wait for the engine's first ready. An engine that exits before it ever was
        ready cannot start as configured (a context whose KV cache does not fit, a
        broken model folder): restarting it forever would only hide why, so the boot
        fails with vLLM's own reason. After the first ready, exits are restarted."""
        proc = self.process
        assert proc is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.pool.ready:
                return True
            if proc.restarts or (proc.proc is not None and proc.proc.poll() is not None):
                code = proc.proc.returncode if proc.proc is not None else None
                await proc.stop()
                raise RuntimeError(f"the engine exited ({code}) before it was ready: "
                                   f"{engine_failure(proc.log_path)} (log: {proc.log_path})")
            await asyncio.sleep(0.2)
        return self.pool.ready

    async def _model_dir(self) -> str:
        s = self.settings
        if s.model is None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agentloop.serve.engine.default_model",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "AGENTLOOP_HOME": str(s.home), "HF_HUB_OFFLINE": "1"},
            )
            out, err = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"preparing the default model failed: {err.decode()[-2000:]}")
            return out.decode().strip().splitlines()[-1]
        return s.model

    def _add_base_adapter(self, model: str, config: Path) -> None:
        if not config.exists():
            # A hub id: its config comes from the hub cache (or the network where there is one).
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(model, "config.json"))
        root = self.settings.adapters_dir / model_slug(model)
        write_zero_adapter(config.parent, root / BASE_VERSION)
        self.adapters.bind(root, base_model=str(config.parent))

    async def _attach(self) -> None:
        self.state = "waiting for engines"
        root = None
        async with httpx.AsyncClient(timeout=5.0) as client:
            while root is None:
                for url in self.settings.engine_urls:
                    try:
                        data = (await client.get(f"{url}/v1/models")).json()["data"]
                        # The base model card is the one with no parent.
                        root = next(m.get("root") or m["id"] for m in data if not m.get("parent"))
                        break
                    except (httpx.HTTPError, ValueError, KeyError, StopIteration):
                        continue
                if root is None:
                    await asyncio.sleep(1.0)
        model = self.settings.model or root
        self.state = "writing base adapter"
        self._add_base_adapter(model, Path(model) / "config.json")
        self.state = "loading adapters"
        if await self.pool.wait_ready(self.settings.engine_startup_timeout):
            self.state = "running"

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()
