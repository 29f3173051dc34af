"""Runs learning-loop iterations for the gateway: on admin request or on a schedule.

The iteration itself is rl/loop.py; this module gives it the serving hooks
(load a candidate into the engines, chat with it, promote it) and decides
when to start one.

Invariants:
- at most one training runs at a time, across processes: the store refuses a
  second active run (serve/store/runs.py), whoever asks;
- the scheduler's state is the store (the last run's start time is the
  feedback watermark), so it survives restarts; runs left active by a dead
  process are marked failed at start-up;
- iterations run as tasks on the event loop but only await: training and
  scoring happen in subprocesses, SQL in threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Awaitable, Callable

from agentloop.rl.graders import GraderSet
from agentloop.rl.loop import Iteration, LoopConfig
from agentloop.rl.versions import served_name
from agentloop.serve.engine.adapters import AdapterManager
from agentloop.serve.engine.client import EnginePool
from agentloop.serve.errors import AgentloopError, EngineUnavailable, InvalidRequest
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from agentloop.serve.store.runs import ActiveRunExists, owner_id

log = logging.getLogger("agentloop.loop")
Generate = Callable[..., Awaitable[dict]]  # ChatService.generate(body, model=...)


class RunConflict(AgentloopError):
    status = 409
    type = "invalid_request_error"
    code = "run_in_progress"


def _owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run: not ours to judge
    if owner == owner_id():
        return False  # this process just started, so it runs nothing yet
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def run_due(store, cfg: LoopConfig, now: float | None = None) -> tuple[bool, int]:
    """Whether a scheduled run is due: enough new feedback since the last run started, or
    some new feedback and `period_seconds` since then (since the oldest feedback, before
    any run). Shared by the in-gateway scheduler and the `agentloop loop` worker."""
    if store.active_run() is not None:
        return False, 0
    last = (store.list_runs(limit=1) or [None])[0]
    since = last["created_at"] if last else None
    new = store.count_feedback(since=since)
    if new == 0:
        return False, 0
    start = since if since is not None else store.oldest_feedback_time()
    elapsed = (now or time.time()) - start
    return new >= cfg.min_new_feedback or elapsed >= cfg.period_seconds, new


class GatewayHooks:
    """rl.loop.LoopHooks over this gateway's adapter manager and engine pool."""

    def __init__(self, adapters: AdapterManager, pool: EnginePool, generate: Generate | None = None,
                 alias: str = "agentloop"):
        self.adapters = adapters
        self.pool = pool
        self.generate = generate  # ChatService.generate: the chat path, unlogged
        self.alias = alias

    def live_version(self) -> str:
        router = self.adapters.router
        return router.versions[router.live].version

    async def load_candidate(self, version: str) -> str:
        return await self.adapters.load_candidate(version)

    async def unload(self, name: str) -> None:
        await self.adapters.drop_candidate(name)

    async def chat(self, body: dict) -> dict:
        agen = self.pool.chat({**body, "stream": False})
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    async def sample(self, body: dict, version: str) -> dict:
        if self.generate is None:
            raise EngineUnavailable("This gateway has no chat service to sample with.")
        return await self.generate(body, model=served_name(self.alias, version))

    async def promote(self, version: str, reason: str) -> None:
        await self.adapters.promote(version, reason=reason)


class LoopRunner:
    """Starts iterations on request (admin) or on a schedule, one at a time."""

    def __init__(self, settings: Settings, store: Store, adapters: AdapterManager, pool: EnginePool,
                 graders: GraderSet | None = None, generate: Generate | None = None):
        self.settings = settings
        self.generate = generate  # samples for on-policy learning go through the chat path (ChatService.generate)
        self.graders = graders  # the deployment's (serve/compose.py): they grade what reference feedback is about
        self.store = store
        self.adapters = adapters
        self.pool = pool
        self.task: asyncio.Task | None = None
        self._scheduler: asyncio.Task | None = None

    def recover(self) -> list[str]:
        failed = self.store.fail_orphaned_runs(_owner_alive)
        if failed:
            log.warning("marked runs interrupted by a restart as failed: %s", failed)
        return failed

    def config(self, params: dict | None) -> LoopConfig:
        try:
            return LoopConfig.from_params(params, self.settings.loop_defaults())
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"Invalid training parameters: {e}", param="params")

    async def start(self, *, trigger: str, method: str | None = None, promote: bool = True,
                    params: dict | None = None) -> dict:
        if not self.adapters.bound or not self.pool.ready:
            raise EngineUnavailable("The engine is not ready; training needs it for the gate.", retry_after=10)
        params = dict(params or {})
        if method is not None:
            params["method"] = method
        cfg = self.config(params)
        # Every version the deployment has, here too: the next one is numbered after them all.
        await self.adapters.sync_registry()
        try:
            run = await asyncio.to_thread(self.store.create_run, method=cfg.method, trigger=trigger,
                                          promote=promote, params=params)
        except ActiveRunExists as e:
            raise RunConflict(f"Training run {e.run['id']} is already {e.run['status']}.")
        it = Iteration(self.store, self.adapters.registry, base_model=self.adapters.base_model,
                       template=self.settings.template, hooks=GatewayHooks(self.adapters, self.pool, self.generate, self.settings.alias), config=cfg,
                       work_dir=self.settings.home / "runs", graders=self.graders)
        self.task = asyncio.create_task(it.run(run), name=f"run:{run['id']}")
        return run

    def start_scheduler(self) -> None:
        self._scheduler = asyncio.create_task(self._schedule(), name="loop-scheduler")

    async def _schedule(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.loop_check_seconds)
            try:
                await self._maybe_start()
            except asyncio.CancelledError:
                raise
            except AgentloopError as e:
                log.info("scheduled run not started: %s", e.message)
            except Exception:
                log.exception("loop scheduler check failed")

    async def _maybe_start(self) -> None:
        go, new = await asyncio.to_thread(run_due, self.store, self.settings.loop_defaults())
        if go:
            log.info("starting a scheduled run: %d new feedback", new)
            await self.start(trigger="scheduler")

    async def stop(self) -> None:
        for t in (self._scheduler, self.task):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
