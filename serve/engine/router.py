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
service resolves and counts, the adapter manager changes the served set);
`ModelRouter` keeps it in this process. A store-backed implementation (one
served version across several gateways) replaces it behind the same methods.
"""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

from agentloop.rl.versions import BASE_VERSION, served_name
from agentloop.serve.errors import ModelNotFound


@dataclass
class Version:
    name: str          # served name, e.g. "agentloop@v0000"
    version: str       # "v0000"
    path: str          # adapter folder (loaded into the engines unless on_base)
    created: int = field(default_factory=lambda: int(time.time()))
    on_base: bool = False  # runs on the engines' bare base weights: no adapter is loaded for it


class ServedVersions(ABC):
    """Which versions are served under which names, and how many requests each has in flight."""

    alias: str
    versions: dict[str, Version]           # served name -> version
    live: str | None                       # served name the alias resolves to
    canary: tuple[str, float] | None       # (served name, share of the alias's traffic)
    base_on_weights: bool                  # the base version runs on the bare base weights

    def name_of(self, version: str) -> str:
        return served_name(self.alias, version)

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

