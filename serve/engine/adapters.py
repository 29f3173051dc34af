"""Which adapter versions the engines serve: the one place where versions are swapped.

The registry (rl/registry.py: numbered folders with manifests) is the record;
this module makes the engines and the router follow it. Promotion loads the
new version into every engine under its own name (`agentloop@v0002`), then
flips the alias in one step; the version it replaced keeps serving the
requests that started on it and is unloaded only once they have drained.

Invariants:
- a version is verified (files re-hashed and validated) before any engine
  loads it -- on promotion, and again before an engine that restarted loads
  the served versions back (`reverify`); a corrupt or incompatible adapter is
  refused and nothing changes, or, when a served version no longer verifies,
  it stops being served (the live one falls back as at start-up);
- swaps are serialised (one lock), so two admin calls never interleave;
- the base (`v0000`), the live version and the canary are always served; every
  other version is unloaded once idle. The base needs no adapter in the engines
  when it runs on their bare weights (router.base_on_weights, the default); else
  its zero adapter is loaded like any version;
- engines read adapters from this gateway's registry folder, except attached engines
  (`--engine-url`, maybe on another host) of a deployment with a registry URL: they are
  given the version's URL and the hash this gateway verified, and fetch their own copy
  (serve/inside_vllm/adapter_fetch.py), so no engine needs this gateway's disk.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from agentloop.rl.registry import AdapterInvalid, AdapterRegistry, RegistryError, VersionNotFound
from agentloop.rl.registry_url import RegistryMirror
from agentloop.rl.versions import BASE_VERSION, version_of
from agentloop.serve.engine.client import EnginePool
from agentloop.serve.engine.router import ServedState, ServedVersions
from agentloop.serve.errors import EngineUnavailable, InvalidRequest, NotFound, RegistryUnavailable

log = logging.getLogger("agentloop.adapters")


class AdapterManager:
    """Adapter residency for one gateway: its router's served set, loaded into its engine pool.

    Built unbound by the composition root (serve/compose.py); `bind` gives it the
    registry once the base model is known (serve/engine/boot.py), and until then
    every operation answers 503. Everything that changes what is served goes
    through `promote`, `rollback`, `set_canary`, `load_candidate`/`drop_candidate`
    and `reverify`, so a store-backed implementation (several gateways) can take
    this one's place behind the same methods; `router` is a `ServedVersions`.
    """

    def __init__(self, router: ServedVersions, pool: EnginePool | None, *, max_rank: int,
                 registry_url: str | None = None, engines_fetch: bool = False):
        self.router = router
        self.pool = pool
        self.max_rank = max_rank
        self.registry_url = registry_url
        # The engines fetch versions from registry_url themselves (attached ones: maybe on
        # another host than this gateway's registry folder).
        self.engines_fetch = engines_fetch and registry_url is not None
        self.registry: AdapterRegistry | None = None
        self.mirror: RegistryMirror | None = None  # the deployment's registry at registry_url
        self.base_model: str | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self.follow_error: str | None = None  # why the shared served state is not applied here yet
        self._follower: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def bound(self) -> bool:
        return self.registry is not None

    def bind(self, root: Path | str, base_model: str | None) -> None:
        """Serve from the registry of `base_model`'s adapters at `root` (v0000 already written),
        and, when the served state is shared, follow it from now on (`follow`)."""
        self.registry = AdapterRegistry(root, max_rank=self.max_rank)
        if self.registry_url is not None:
            self.mirror = RegistryMirror(self.registry_url, self.registry)
        self.base_model = base_model
        self.restore()
        if self.router.shared and self._loop is not None:
            # bind may run outside the loop (an embedder's thread): start following on it.
            self._loop.call_soon_threadsafe(self._start_following)

    async def start(self) -> None:
        """Remember the gateway's event loop: following starts on it once bound."""
        self._loop = asyncio.get_running_loop()

    def _start_following(self) -> None:
        if self._follower is None:
            self._follower = asyncio.create_task(self.follow(), name="served-follow")

    async def aclose(self) -> None:
        """Stop following the shared state (the gateway is stopping)."""
        for t in [self._follower, *self._retiring]:
            if t is not None:
                t.cancel()
        self._follower = None

    @property
    def state_applied(self) -> bool:
        """False only while a gateway that follows the shared state has not applied it yet."""
        return not (self.router.shared and self._loop and self.bound) or self.router.generation > 0

    def served_health(self) -> dict:
        """The served state as /health shows it: which generation is applied here, and why not a newer one."""
        return {"shared": self.router.shared, "generation": self.router.generation,
                "error": self.follow_error or getattr(self.router, "error", None)}

    def _registry(self) -> AdapterRegistry:
        if self.registry is None:
            raise EngineUnavailable("Adapters are not available yet; retry shortly.", retry_after=10)
        return self.registry

    def restore(self) -> None:
        """At start-up: serve the base and whatever the registry says is live (if it still verifies)."""
        base = self._registry().get(BASE_VERSION)
        self.router.add_version(BASE_VERSION, self._engine_path(base))
        live = self._verified_live()
        if live is not None:
            self.router.add_version(live.version, self._engine_path(live), live=True)
        else:
            self.router.set_live(self.router.name_of(BASE_VERSION))

    def _verified_live(self):
        """The registry's live version, re-verified like a promotion is.

        A live version whose files no longer verify (damaged or changed on disk
        since it was promoted) must not be served: every engine would refuse
        it, and an engine missing a served adapter is never ready, so the whole
        gateway would answer 503 forever. It is marked rejected with the reason
        and the next live one (after a crash mid-promotion, the previous) or the
        base serves instead, until an operator promotes again.
        """
        while (live := self.registry.live()) is not None and live.version != BASE_VERSION:
            try:
                return self.registry.verify(live.version)
            except RegistryError as e:
                log.error("live adapter %s failed verification at start-up, not serving it: %s", live.version, e)
                self.registry.set_status(live.version, "rejected", f"failed verification at start-up: {e}")
        return live

    def reverify(self, name: str) -> bool:
        """Before an engine loads the served version `name` again (it restarted): may it?

        The files were verified when the version was promoted, but an engine that
        restarts reads them again from disk, and they may have been damaged or
        changed since. A version that no longer verifies is not loaded and stops
        being served: the live one is marked rejected and the alias falls back as at
        start-up (`_verified_live`: the registry's next live version, else the base),
        a canary ends, a pinned version is dropped. Returns False for a name that must
        not be loaded; the engine then looks at the (changed) served set again.
        The base is our own zero adapter, rewritten at every start: not re-hashed.
        """
        if self.registry is None:
            return True  # nothing promoted can be served before the registry is bound
        v = self.router.versions.get(name)
        if v is None:
            return False  # no longer served (retired meanwhile)
        if v.version == BASE_VERSION:
            return True
        try:
            self.registry.verify(v.version)
            return True
        except RegistryError as e:
            reason = f"failed verification on an engine restart: {e}"
        log.error("adapter %s %s; not serving it", v.version, reason)
        if name == self.router.live:
            self.registry.set_status(v.version, "rejected", reason)
            live = self._verified_live()
            if live is None or live.version == BASE_VERSION:
                self.router.set_live(self.router.name_of(BASE_VERSION))
            else:
                self.router.add_version(live.version, self._engine_path(live), live=True)
            log.error("alias %s now serves %s", self.router.alias, self.router.live)
        elif self.router.canary and self.router.canary[0] == name:
            self.router.set_canary(None)
            self.registry.set_status(v.version, "rejected", reason)
        self.router.remove(name)
        return False

    @contextmanager
    def _registry_errors(self, version: str) -> Iterator[None]:
        """The registry's errors about `version` (local, or at the URL), as the edge answers them."""
        try:
            yield
        except VersionNotFound:
            raise NotFound(f"No adapter version {version!r}.", param="version", code="version_not_found")
        except AdapterInvalid as e:
            raise InvalidRequest(f"Adapter {version} was refused: {e}", param="version", code="adapter_invalid")
        except RegistryError as e:
            raise InvalidRequest(str(e), param="version", code="adapter_invalid")

    def _manifest(self, version: str):
        with self._registry_errors(version):
            return self._registry().verify(version)

    async def _mirrored(self, what, version: str):
        """Run a registry-URL transfer (`fetch` or `publish`) in a thread, its errors made ours."""
        with self._registry_errors(version):
            try:
                return await asyncio.to_thread(what, version)
            except ValueError as e:  # a version name or manifest the URL's side does not accept
                raise RegistryError(str(e)) from e
            except OSError as e:  # the filesystem behind the URL: unreachable, refused, ...
                log.error("registry %s: %s: %s", self.mirror.url, type(e).__name__, e)
                raise RegistryUnavailable() from e

    async def sync_registry(self) -> list[str]:
        """Fetch every version the deployment's registry has and this gateway lacks (before training,
        so a new version is numbered after all of them); returns those fetched."""
        if self.mirror is None:
            return []
        return await asyncio.to_thread(self.mirror.pull)

    async def _load(self, version: str):
        """Verify and load `version` into every ready engine; register it with the router.
        A version this gateway lacks is fetched from the registry URL first (hashes checked)."""
        if self.mirror is not None:
            await self._mirrored(self.mirror.fetch, version)
        m = self._manifest(version)
        if m.base_model and self.base_model and str(m.base_model) != str(self.base_model):
            raise InvalidRequest(f"Adapter {version} was trained for {m.base_model}, not {self.base_model}.",
                                 param="version", code="adapter_incompatible")
        name = self.router.name_of(m.version)
        if self.pool is None or not self.pool.ready:
            raise EngineUnavailable()
        if self.router.base_on_weights and m.version == BASE_VERSION:
            # The base runs on the engines' own weights: nothing to load (a rollback to it).
            return m, self.router.add_version(m.version, str(m.path))
        if self.engines_fetch:
            await self._upload(m.version)  # where the engines fetch it from (a no-op if there)
        path = self._engine_path(m)
        try:
            await self.pool.load_adapter(name, path)
        except EngineUnavailable:
            raise
        except Exception as e:
            # The engine refused it (e.g. shapes that do not fit the base model).
            await self._unload_quietly(name)
            raise InvalidRequest(f"The engine refused adapter {version}: {e}", param="version",
                                 code="adapter_invalid") from e
        return m, self.router.add_version(m.version, path)

    def _engine_path(self, m) -> str:
        """What the engines load `m` (a verified manifest) from: this gateway's folder, or the
        version's registry URL with the weights' hash (engines that fetch; not the base, which
        every process writes itself and which runs on the bare weights by default)."""
        if self.engines_fetch and self.mirror is not None and m.version != BASE_VERSION:
            return self.mirror.source(m.version, m.weights_sha256)
        return str(m.path)

    async def load_candidate(self, version: str) -> str:
        """Load `version` beside the served ones without routing the alias to it (the loop's
        gate talks to it by its served name, which this returns)."""
        async with self._lock:
            m, v = await self._held_load(version)
            # The trainer publishes what it made at once, served or not: its number is then
            # taken at the registry URL, and no other gateway's next version can reuse it.
            try:
                await self._upload(m.version)
            except BaseException:
                await self._undo_load(v.name)
                raise
            return v.name

    async def drop_candidate(self, name: str) -> None:
        """Unload a candidate `load_candidate` loaded, unless it became the live, canary or base version."""
        async with self._lock:
            if name in self._kept():
                return
            self.router.remove(name)
            await self.router.unload_unheld(name, lambda: self._unload_quietly(name))

    def _kept(self) -> tuple:
        return (self.router.live, self.router.canary and self.router.canary[0], self.router.name_of(BASE_VERSION))

    async def _held_load(self, version: str):
        """`_load`, with the version held first, so no other gateway unloads it from a shared
        engine between our load and our first request on it."""
        await self.router.hold((self.router.name_of(version),))
        return await self._load(version)

    def _wanted(self, **change) -> ServedState:
        """The current state with `change` applied (versions, not served names)."""
        r = self.router
        canary, share = (version_of(r.canary[0]), r.canary[1]) if r.canary else (None, 0.0)
        cur = dict(live=version_of(r.live) if r.live else BASE_VERSION, canary=canary, share=share, reason="")
        cur.update(change)
        if cur["canary"] == cur["live"] or not cur["share"]:
            cur["canary"], cur["share"] = None, 0.0
        return ServedState(**cur)

    async def _publish(self, state: ServedState, version: str, loaded: str) -> ServedState:
        """Put `version` at the registry URL, then record `state` for every gateway; if either
        fails, unload what was loaded for it (`loaded`, its served name) and nothing changed."""
        try:
            await self._upload(version)
            return await self.router.publish(state)
        except BaseException:
            await self._undo_load(loaded)
            raise

    async def _upload(self, version: str) -> None:
        """Put `version` at the registry URL (if there is one) before any gateway is told to serve it."""
        if self.mirror is not None:
            await self._mirrored(self.mirror.publish, version)

    async def _undo_load(self, loaded: str) -> None:
        if loaded not in self._kept() and loaded in self.router.versions:
            self.router.remove(loaded)
            await self.router.unload_unheld(loaded, lambda: self._unload_quietly(loaded))

    async def promote(self, version: str, reason: str = "promoted") -> dict:
        async with self._lock:
            m, v = await self._held_load(version)
            state = await self._publish(self._wanted(live=m.version, reason=reason), m.version, v.name)
            old = self._flip(v.name, state)
            self.registry.set_status(m.version, "live", reason)
            return {"version": m.version, "previous": old and version_of(old), "status": "live",
                    "generation": state.generation}

    def _flip(self, name: str, state: ServedState) -> str | None:
        """Route the alias to `name` (loaded) in one step; retire what it replaced once drained."""
        old = self.router.set_live(name)
        self.router.generation = max(self.router.generation, state.generation)
        if old != name:
            log.info("alias %s now serves %s (was %s; generation %d)", self.router.alias, name, old,
                     state.generation)
            if old:
                self._retire_later(old)
        return old

    async def rollback(self, version: str) -> dict:
        return await self.promote(version, reason="rollback")

    async def set_canary(self, version: str | None, share: float) -> dict:
        if not 0.0 <= share <= 1.0:
            raise InvalidRequest("'share' must be between 0 and 1.", param="share")
        async with self._lock:
            if version is None or share == 0:
                state = await self.router.publish(self._wanted(canary=None, share=0.0, reason="canary ended"))
                self._set_canary(None, 0.0, state)
            else:
                m, v = await self._held_load(version)
                if v.name == self.router.live:
                    raise InvalidRequest(f"{version} is already live.", param="version")
                state = await self._publish(self._wanted(canary=m.version, share=share, reason="canary"),
                                            m.version, v.name)
                self._set_canary(v.name, share, state)
            c = self.router.canary
            return {"version": version_of(c[0]) if c else None, "share": c[1] if c else 0.0}

    def _set_canary(self, name: str | None, share: float, state: ServedState) -> None:
        old = self.router.canary[0] if self.router.canary else None
        self.router.set_canary(name, share)
        self.router.generation = max(self.router.generation, state.generation)
        if old and old != name:
            self._retire_later(old)

    # ------------------------------------------------------------ following the shared state

    async def follow(self) -> None:
        """Apply every change of the shared served state (made by any gateway) here, forever.

        First the deployment's state (seeded with this gateway's registry's live version
        when there is none yet), then each newer one. A state that cannot be applied yet
        (an engine down, a version that does not verify here) is tried again after a
        pause, while the last applied state keeps serving."""
        if not self.router.shared:
            return  # not shared: this process's own changes are all there is
        pending: ServedState | None = None
        watch = None
        while True:
            try:
                if watch is None:
                    pending = await self.router.seed(version_of(self.router.live) if self.router.live
                                                     else BASE_VERSION)
                    watch = self.router.watch()
                if pending is None:
                    pending = await anext(watch)
                await self.apply(pending)
                self.follow_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                what = f"generation {pending.generation}" if pending else "the served state"
                self.follow_error = f"{what} not applied: {type(e).__name__}: {e}"
                log.error("%s", self.follow_error)
                await asyncio.sleep(1.0)
                watch = None  # start over: the deployment's state, then what changes after it
            pending = None

    async def apply(self, state: ServedState) -> None:
        """Make this gateway serve `state` (loading what it lacks), unless it already applied it."""
        async with self._lock:
            r = self.router
            if state.generation <= r.generation:
                return
            live = r.name_of(state.live)
            if live != r.live or live not in r.versions:
                _, v = await self._held_load(state.live)
                self._flip(v.name, state)
            canary = r.name_of(state.canary) if state.canary and state.share > 0 else None
            if canary is not None and canary not in r.versions:
                await self._held_load(state.canary)
            if (r.canary or (None, 0.0)) != (canary, state.share if canary else 0.0):
                self._set_canary(canary, state.share, state)
            r.generation = state.generation
            await r.hold()

    def _retire_later(self, name: str) -> None:
        task = asyncio.create_task(self._retire(name))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, name: str) -> None:
        """Unload a replaced version once the requests that started on it are done (here, and,
        on a shared engine, on every other gateway that still routes to it)."""
        await self.router.wait_drained(name)
        async with self._lock:
            if name in self._kept():
                return  # it came back (rollback) while draining
            on_base = name in self.router.base_names()
            self.router.remove(name)
            if on_base:
                return  # the engines' own weights: nothing to unload
            if await self.router.unload_unheld(name, lambda: self._unload_quietly(name)):
                log.info("unloaded %s", name)
            else:
                log.info("no longer routing to %s (another gateway still does: left loaded)", name)

    async def _unload_quietly(self, name: str) -> None:
        try:
            await self.pool.unload_adapter(name)
        except Exception as e:  # not loaded there, or the engine is down: nothing to undo
            log.debug("unload %s: %s", name, e)

    def list(self) -> list[dict]:
        out = []
        for m in self._registry().list():
            d = m.to_dict()
            d["served"] = self.router.name_of(m.version) in self.router.versions
            out.append(d)
        return out
