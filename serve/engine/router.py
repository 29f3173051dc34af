"""Which model names the gateway serves and what each resolves to in the engines.

Clients ask for the alias (`agentloop`) or a pinned version (`agentloop@v0003`).
Every name resolves to a version: a LoRA adapter loaded in the engines, or, for
the base version `v0000` when `base_on_weights` is set (the default), the
engines' bare base weights, so that the base pays no LoRA cost (the engines
translate its served name to their base model's: `base_names`). The zero adapter
(rl/zero_adapter.py) still stands for it on disk and is what training starts
from. A canary takes a share of the alias's traffic.

Invariants:
- `resolve` is a pure in-memory lookup (no I/O on the request path), and the
  alias flips between versions in one assignment, so every request resolves
  to exactly one version, which its log row records;
- a version counts its in-flight requests (`acquire`/`release`), so the
  version it replaced is unloaded only once they have all finished.

`ServedVersions` is the interface the rest of the gateway uses (the chat
service resolves and counts, the adapter manager changes the served set).
`ModelRouter` keeps it in this process: what one gateway serves is its own.
`StoreServedVersions` is the same routing table whose *desired* state (live
version, canary and share: a `ServedState`, numbered by a generation) lives in
the store, so that every gateway on one database serves the same versions: a
change is published there in one transaction (`publish`), every gateway
watches for it (`watch`) and applies it through its adapter manager, and a
version is unloaded from the engines only by the last gateway that lets go of
it (`unload_unheld`, over the store's holds). Requests still resolve in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from agentloop.rl.versions import BASE_VERSION, served_name
from agentloop.serve.errors import ModelNotFound, StoreUnavailable

if TYPE_CHECKING:
    from agentloop.serve.store.db import Store

log = logging.getLogger("agentloop.router")


@dataclass
class Version:
    name: str          # served name, e.g. "agentloop@v0000"
    version: str       # "v0000"
    path: str          # adapter folder (loaded into the engines unless on_base)
    created: int = field(default_factory=lambda: int(time.time()))
    on_base: bool = False  # runs on the engines' bare base weights: no adapter is loaded for it


@dataclass(frozen=True)
class ServedState:
    """What the alias should serve: the live version, the canary and its share (versions, e.g. "v0002")."""

    live: str
    canary: str | None = None
    share: float = 0.0
    generation: int = 0   # grows by one with every change; a gateway applies each once
    reason: str = ""

    @classmethod
    def from_row(cls, row: dict) -> "ServedState":
        return cls(live=row["live"], canary=row.get("canary"), share=float(row.get("canary_share") or 0.0),
                   generation=int(row["generation"]), reason=row.get("reason") or "")


class ServedVersions(ABC):
    """Which versions are served under which names, and how many requests each has in flight."""

    alias: str
    versions: dict[str, Version]           # served name -> version
    live: str | None                       # served name the alias resolves to
    canary: tuple[str, float] | None       # (served name, share of the alias's traffic)
    base_on_weights: bool                  # the base version runs on the bare base weights
    generation: int = 0                    # the last ServedState applied here
    shared: bool = False                   # the desired state is shared with other gateways

    def name_of(self, version: str) -> str:
        return served_name(self.alias, version)

    # The desired state. In one process it is simply what the adapter manager sets;
    # shared (StoreServedVersions) it is a row that every gateway follows.

    async def seed(self, live: str) -> ServedState | None:
        """The state to start from: the shared one, seeded with `live` if there is none (None: not shared)."""
        return None

    async def publish(self, state: ServedState) -> ServedState:
        """Record `state` as what every gateway serves; returns it with its generation."""
        return ServedState(state.live, state.canary, state.share, self.generation + 1, state.reason)

    async def watch(self) -> AsyncIterator[ServedState]:
        """Every change of the desired state made elsewhere (newer than `generation`), forever."""
        return
        yield  # an async generator that yields nothing: one process has no "elsewhere"

    async def hold(self, extra: tuple[str, ...] = ()) -> None:
        """Say that this gateway routes to its versions (and `extra`, about to be loaded)."""

    async def unload_unheld(self, name: str, unload: Callable[[], Awaitable[None]]) -> bool:
        """Run `unload` unless another gateway still routes to `name`; True if it ran."""
        await unload()
        return True

    @abstractmethod
    def add_version(self, version: str, path: str, *, live: bool = False) -> Version: ...

    @abstractmethod
    def set_live(self, name: str) -> str | None:
        """Flip the alias to `name` in one step; returns the version it replaced."""

    @abstractmethod
    def set_canary(self, name: str | None, share: float = 0.0) -> None: ...

    @abstractmethod
    def remove(self, name: str) -> None: ...

    @abstractmethod
    def adapters(self) -> dict[str, str]:
        """Every adapter the engines must hold: served name -> folder (not the on-base versions)."""

    @abstractmethod
    def base_names(self) -> frozenset[str]:
        """Served names that run on the engines' bare base weights (no I/O: on the request path)."""

    @abstractmethod
    def resolve(self, name: str) -> Version:
        """The version a request for `name` runs on (no I/O: on the request path)."""

    @abstractmethod
    def acquire(self, v: Version) -> None: ...

    @abstractmethod
    def release(self, v: Version) -> None: ...

    @abstractmethod
    async def wait_drained(self, name: str, timeout: float | None = None) -> bool: ...

    @abstractmethod
    def list_models(self) -> list[dict]: ...


class ModelRouter(ServedVersions):
    """The served versions of one gateway process, in memory."""

    def __init__(self, alias: str, *, base_on_weights: bool = True, rng: random.Random | None = None):
        self.alias = alias
        self.base_on_weights = base_on_weights
        self.versions: dict[str, Version] = {}
        self.live: str | None = None           # served name of the live version
        self.canary: tuple[str, float] | None = None  # (served name, share of alias traffic)
        self.inflight: Counter[str] = Counter()
        self._idle: asyncio.Condition | None = None  # made on first wait, inside the loop
        self._rng = rng or random.Random()

    def add_version(self, version: str, path: str, *, live: bool = False) -> Version:
        v = self.versions.get(self.name_of(version))
        if v is None or v.path != path:
            v = Version(name=self.name_of(version), version=version, path=path,
                        on_base=self.base_on_weights and version == BASE_VERSION)
            self.versions[v.name] = v
        if live or self.live is None:
            self.live = v.name
        return v

    def set_live(self, name: str) -> str | None:
        """Flip the alias to `name` in one step; returns the version it replaced."""
        if name not in self.versions:
            raise ModelNotFound(name)
        old, self.live = self.live, name
        if self.canary and self.canary[0] == name:
            self.canary = None
        return old

    def set_canary(self, name: str | None, share: float = 0.0) -> None:
        if name is None or share <= 0:
            self.canary = None
            return
        if name not in self.versions:
            raise ModelNotFound(name)
        self.canary = (name, share)

    def remove(self, name: str) -> None:
        if name in (self.live, self.canary and self.canary[0]):
            raise ValueError(f"{name} is still served")
        self.versions.pop(name, None)

    def adapters(self) -> dict[str, str]:
        """Every adapter the engines must hold: served name -> folder (not the on-base versions)."""
        return {v.name: v.path for v in self.versions.values() if not v.on_base}

    def base_names(self) -> frozenset[str]:
        return frozenset(n for n, v in self.versions.items() if v.on_base)

    def resolve(self, name: str) -> Version:
        if name == self.alias and self.live is not None:
            if self.canary and self._rng.random() < self.canary[1]:
                return self.versions[self.canary[0]]
            return self.versions[self.live]
        v = self.versions.get(name)
        if v is None:
            raise ModelNotFound(name)
        return v

    def acquire(self, v: Version) -> None:
        self.inflight[v.name] += 1

    def release(self, v: Version) -> None:
        self.inflight[v.name] -= 1
        if self.inflight[v.name] <= 0:
            del self.inflight[v.name]
            if self._idle is not None:
                asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._idle:
            self._idle.notify_all()

    async def wait_drained(self, name: str, timeout: float | None = None) -> bool:
        """Wait until no request started on `name` is still running."""
        if self._idle is None:
            self._idle = asyncio.Condition()
        async with self._idle:
            try:
                await asyncio.wait_for(self._idle.wait_for(lambda: self.inflight[name] <= 0), timeout)
            except TimeoutError:
                return False
        return True

    def list_models(self) -> list[dict]:
        out = []
        if self.live is not None:
            live = self.versions[self.live]
            out.append({"id": self.alias, "object": "model", "created": live.created,
                        "owned_by": "agentloop", "version": live.version,
                        "canary": ({"version": self.versions[self.canary[0]].version, "share": self.canary[1]}
                                   if self.canary else None)})
        for v in self.versions.values():
            out.append({"id": v.name, "object": "model", "created": v.created,
                        "owned_by": "agentloop", "version": v.version, "parent": self.alias,
                        "live": v.name == self.live})
        return out



def gateway_id() -> str:
    """One gateway, as the store's holds name it: host, process and a random tail (two
    gateways in one process, or a restarted one, are different holders)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class StoreServedVersions(ModelRouter):
    """A `ModelRouter` whose desired state is the store's, shared by every gateway on one database.

    The routing table stays in memory (requests resolve without I/O); what it should
    say is the alias's row in the store (serve/store/served.py). `watch` yields each
    newer state: PostgreSQL wakes it by LISTEN/NOTIFY, SQLite by a `poll` of the row,
    so a change reaches every gateway within about `poll` seconds plus the time to load
    the version (measured: bench/scale_out.py). While it waits it renews this gateway's
    holds every `heartbeat` seconds; a gateway not heard from for `hold_ttl` seconds
    (it died) no longer keeps a version loaded for anyone.
    """

    shared = True

    def __init__(self, alias: str, store: "Store", *, base_on_weights: bool = True, poll: float = 0.1,
                 heartbeat: float = 5.0, hold_ttl: float = 30.0, rng: random.Random | None = None):
        super().__init__(alias, base_on_weights=base_on_weights, rng=rng)
        self.store = store
        self.gateway = gateway_id()
        self.poll = poll
        self.heartbeat = heartbeat
        self.hold_ttl = hold_ttl
        self.error: str | None = None   # why the last watch or apply failed, for /health
        self._holding = asyncio.Lock()

    async def seed(self, live: str) -> ServedState:
        row = await asyncio.to_thread(self.store.init_served, self.alias, live, by=self.gateway)
        return ServedState.from_row(row)

    async def publish(self, state: ServedState) -> ServedState:
        row = await asyncio.to_thread(self.store.set_served, self.alias, live=state.live, canary=state.canary,
                                      share=state.share, by=self.gateway, reason=state.reason)
        return ServedState.from_row(row)

    async def watch(self) -> AsyncIterator[ServedState]:
        backoff = 0.5
        while True:
            try:
                await self.hold()
                row = await asyncio.to_thread(self.store.wait_served, self.alias, self.generation,
                                              self.heartbeat, poll=self.poll)
                backoff, self.error = 0.5, None
            except StoreUnavailable:
                self.error = "the database is unavailable; serving the last state applied"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if row is not None and row["generation"] > self.generation:
                yield ServedState.from_row(row)

    def held(self, extra: tuple[str, ...] = ()) -> frozenset[str]:
        """The served names this gateway routes to (adapters only: the base weights need no hold)."""
        return frozenset(self.adapters()) | frozenset(extra)

    async def hold(self, extra: tuple[str, ...] = ()) -> None:
        # One hold or release of this gateway at a time, each reading the served set when its
        # turn comes: a heartbeat that read it before a version was retired must not write it
        # back after that version's release (then no gateway would ever unload it).
        async with self._holding:
            await asyncio.to_thread(self.store.hold_served, self.alias, self.gateway, self.held(extra))

    async def unload_unheld(self, name: str, unload: Callable[[], Awaitable[None]]) -> bool:
        """Release this gateway's hold of `name`; unload it if nobody else holds it. The unload
        runs inside the store's holds lock, so a gateway that starts holding `name` meanwhile
        waits for it, and then loads the version again."""
        loop = asyncio.get_running_loop()

        def then() -> None:
            asyncio.run_coroutine_threadsafe(unload(), loop).result(timeout=120)

        async with self._holding:
            return await asyncio.to_thread(self.store.release_hold, self.alias, self.gateway, name,
                                           ttl=self.hold_ttl, then=then)
