"""The composition root: builds one gateway's parts once and hands each its collaborators.

`Gateway` is only the box the parts travel in: the HTTP edge (serve/http) reads
them from it, and no part ever receives it. Each part gets exactly what it uses
through its constructor:

    Settings ──► Store ─► LogWriter, Access (keys, limits), LoopRunner
    StoreServedVersions (ServedVersions) ─► AdapterManager, ChatService, engines' served set
        (it gets the Store at start; the manager follows the store's served state from bind on)
    engines ─► EnginePool ─► AdapterManager, ChatService, LoopRunner, Boot
    AdapterManager ─► Boot (binds it to the base model's registry), LoopRunner

One cycle is closed here, on purpose: an engine that restarts asks the adapter
manager whether it may load a served version again (`reverify`), and the
manager loads versions through the pool of those engines. The engines get a
forwarder to the manager, which is built right after them.

Invariants:
- the constructor wires the in-memory parts (router, engines, pool, adapter
  manager, boot); `start` opens the store and builds what needs it, in
  dependency order, and `stop` takes them down in reverse; a part that fails to
  start leaves nothing running (the store closes);
- blocking start-up work (opening the store, its migrations, reading keys,
  marking orphaned runs failed) runs in threads, never on the event loop;
- importing this module does not import torch or vllm.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agentloop.rl.graders import build_graders
from agentloop.serve.engine.adapters import AdapterManager
from agentloop.serve.engine.boot import Boot, http_engines
from agentloop.serve.engine.client import Engine, EnginePool
from agentloop.serve.engine.router import StoreServedVersions
from agentloop.serve.services.access import Access
from agentloop.serve.metrics import Metrics
from agentloop.serve.services.chat import ChatService
from agentloop.serve.services.grading import Grading
from agentloop.serve.services.loop import LoopRunner
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from agentloop.serve.store.logwriter import LogWriter
from agentloop.serve.protocol import ThinkingBudgets
from agentloop.templates.registry import get_template


def thinking_budgets(settings: Settings) -> ThinkingBudgets:
    """The thinking budgets of this deployment; none where the template has no thinking mode
    (its engine then has no reasoning config, and a budget would be vLLM's 400)."""
    tpl = get_template(settings.template)
    return ThinkingBudgets(default=settings.thinking_budget, by_effort=dict(settings.thinking_effort_budgets),
                           enabled=tpl.supports_thinking and tpl.reasoning_parser is not None)


class Gateway:
    """The parts of one gateway, built by `start` and torn down by `stop`."""

    def __init__(self, settings: Settings, engines: list[Engine] | None = None):
        """The parts that need no I/O, wired at once; `start` adds those that do."""
        self.settings = settings
        self.metrics = Metrics()
        # What is served is the store's (every gateway on the database follows it); the
        # router gets the store once `start` has opened it, before anything is served.
        self.router = StoreServedVersions(settings.alias, None, base_on_weights=settings.base_on_weights,
                                          poll=settings.served_poll_seconds,
                                          heartbeat=settings.served_heartbeat_seconds,
                                          hold_ttl=settings.served_hold_ttl_seconds)

        def reverify(name: str) -> bool:  # the forwarder that closes the engines <-> manager cycle
            return self.adapters.reverify(name)

        # Tests and embedders may bring their own engines; then nothing is supervised (no Boot).
        self.pool = EnginePool(engines if engines is not None else http_engines(settings, self.router, reverify))
        self.adapters = AdapterManager(self.router, self.pool, max_rank=settings.max_lora_rank,
                                       registry_url=settings.registry_url,
                                       engines_fetch=bool(settings.engine_urls) and engines is None)
        self.boot: Boot | None = Boot(settings, self.pool, self.adapters) if engines is None else None
        self.store: Store | None = None
        self.writer: LogWriter | None = None
        self.access: Access | None = None
        self.loop: LoopRunner | None = None
        self.chat: ChatService | None = None
        self.grading: Grading | None = None
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        s = self.settings
        self.store = await asyncio.to_thread(Store, s.db_url, connect_timeout=s.db_connect_timeout,
                                             pool_size=s.db_pool_size)
        self.router.store = self.store
        await self.adapters.start()
        access = Access(s, self.store)
        try:
            await asyncio.to_thread(access.start)  # refuses a public address without keys (StartupRefused)
        except BaseException:
            await asyncio.to_thread(self.store.close)
            raise
        self.access = access
        self.spawn(access.run())  # re-reads the keys every keys_refresh_seconds
        self.writer = LogWriter(self.store, maxsize=s.log_queue_size)
        graders = build_graders(s.graders, served=self._served)  # one set: grading and the loop's datasets
        self.grading = Grading(self.store, graders, flush=self.writer.flush)
        self.chat = ChatService(self.router, self.pool, self.writer, self.metrics, spawn=self.spawn,
                                tool_outcomes=self.grading.record_tool_outcomes,
                                thinking=thinking_budgets(s))
        self.loop = LoopRunner(s, self.store, self.adapters, self.pool, graders=graders, generate=self.chat.generate)
        await asyncio.to_thread(self.loop.recover)
        await self.pool.start()
        if self.boot is not None:
            self.spawn(self.boot.run())
        if s.loop_enabled:
            self.loop.start_scheduler()

    async def stop(self) -> None:
        await self.adapters.aclose()
        if self.loop is not None:
            await self.loop.stop()
        if self.boot is not None:
            await self.boot.stop()
        if self.pool is not None:
            await self.pool.aclose()
        for t in list(self._tasks):
            t.cancel()
        if self.grading is not None:
            await asyncio.to_thread(self.grading.graders.close)
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def health(self) -> dict[str, Any]:
        engines = [{"url": e.url, "ready": e.ready, "error": getattr(e, "last_error", None),
                    "max_model_len": e.max_model_len}
                   for e in (self.pool.engines if self.pool else [])]
        # Shared served state: not ready before the deployment's state is applied here.
        ready = bool(self.pool and self.pool.ready and self.router.versions
                     and self.adapters.state_applied)
        return {"status": "ok" if ready else "starting", "ready": ready, "engines": engines,
                "max_model_len": self.pool.max_model_len if self.pool else None,
                "live": self.router.live, "served": self.adapters.served_health(),
                "boot": self.boot.state if self.boot else None,
                "engine_dtype": self.engine_dtype()}

    def _served(self) -> tuple[str, str]:
        """Where a judge grader without a URL asks: the first ready engine, the live version."""
        engine = next((e for e in self.pool.engines if e.ready), self.pool.engines[0])
        live = self.router.live
        if live is None or live in self.router.base_names():
            return f"{engine.url}/v1", getattr(engine, "base_model", None) or f"{self.settings.alias}-base"
        return f"{engine.url}/v1", live

    def engine_dtype(self) -> dict[str, str] | None:
        """The supervised engine's dtype and why it was chosen (None when attached: theirs)."""
        p = self.boot.precision if self.boot else None
        return {"dtype": p.vllm_dtype, "reason": p.reason} if p else None
