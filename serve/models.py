"""Which model names the gateway serves and what each resolves to in the engines.

Clients ask for the alias (`agentloop`) or a pinned version (`agentloop@v0000`).
Every name resolves to a LoRA adapter loaded in the engines — never to the bare
base model (see serve/zero_adapter.py for why).

Invariant: `resolve` is a pure in-memory lookup (no I/O on the request path),
and the alias flips between versions in one assignment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import ModelNotFound


@dataclass
class Version:
    name: str          # served name, e.g. "agentloop@v0000"
    version: str       # "v0000"
    path: str          # adapter folder loaded into the engines
    created: int = field(default_factory=lambda: int(time.time()))


class ModelRouter:
    def __init__(self, alias: str):
        self.alias = alias
        self.versions: dict[str, Version] = {}
        self.live: str | None = None  # served name of the live version

    def add_version(self, version: str, path: str, *, live: bool = False) -> Version:
        v = Version(name=f"{self.alias}@{version}", version=version, path=path)
        self.versions[v.name] = v
        if live or self.live is None:
            self.live = v.name
        return v

    def adapters(self) -> dict[str, str]:
        """Every adapter the engines must hold: served name -> folder."""
        return {v.name: v.path for v in self.versions.values()}

    def resolve(self, name: str) -> Version:
        if name == self.alias and self.live is not None:
            return self.versions[self.live]
        v = self.versions.get(name)
        if v is None:
            raise ModelNotFound(name)
        return v

    def list_models(self) -> list[dict]:
        out = []
        if self.live is not None:
            live = self.versions[self.live]
            out.append({"id": self.alias, "object": "model", "created": live.created,
                        "owned_by": "agentloop", "version": live.version})
        for v in self.versions.values():
            out.append({"id": v.name, "object": "model", "created": v.created,
                        "owned_by": "agentloop", "version": v.version, "parent": self.alias})
        return out
