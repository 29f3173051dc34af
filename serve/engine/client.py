"""The engine interface and its vLLM-over-HTTP implementation.

One interface (`Engine`) with one streaming method (`chat`), so the HTTP layer
only converts; `EnginePool` spreads requests over several vLLM OpenAI servers
(a supervised local one, or `--engine-url` ones that already run).

Invariants:
- nothing here imports torch or vllm: engines are reached over HTTP only;
- a stream is forwarded chunk by chunk as it arrives, never buffered whole;
- an engine is `ready` only when healthy AND every served adapter is loaded
  in it, so a request is never routed to an engine that would 404 its model;
- a request is retried on another engine only if it never reached the first
  (connection refused), so no generation is ever run twice;
- a served name that runs on the base weights (`base_names`) goes to the engine
  as its base model's own name, and its answer comes back under the served name,
  so clients and the log never see the difference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import orjson

from agentloop.serve.errors import EngineError, EngineUnavailable, EngineUnreachable

log = logging.getLogger("agentloop.engine")

AdapterSet = Callable[[], dict[str, str]]  # served name -> adapter path
BaseNames = Callable[[], frozenset[str]]  # served names that run on the bare base weights
Reverify = Callable[[str], bool]  # may a restarted engine load this served name again?


class Engine(ABC):
    """A backend that serves OpenAI chat completions and LoRA adapters."""

    url: str
    inflight: int = 0
    # The engine's context length (prompt plus answer), as it reports it; None until known.
    max_model_len: int | None = None

    @property
    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    def chat(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield the response: one dict if not streaming, else each chunk -- or a
        list of the chunks that arrived together, which the gateway then relays
        in one write (under load this is what keeps its per-token cost down).

        Raises EngineError (the engine refused the request) or
        EngineUnavailable (it could not be reached) before the first yield.
        """

    @abstractmethod
    async def load_adapter(self, name: str, path: str) -> None: ...

    @abstractmethod
    async def unload_adapter(self, name: str) -> None: ...

    async def start(self) -> None:  # pragma: no cover - trivial default
        return None

    async def aclose(self) -> None:  # pragma: no cover - trivial default
        return None


class HttpEngine(Engine):
    """A vLLM OpenAI-compatible server reached over HTTP."""

    def __init__(self, url: str, *, adapters: AdapterSet, base_names: BaseNames = frozenset,
                 request_timeout: float = 600.0, health_interval: float = 2.0, reverify: Reverify | None = None,
                 on_down: Callable[["HttpEngine"], Awaitable[None]] | None = None):
        self.url = url.rstrip("/")
        self._adapters = adapters
        self._base_names = base_names
        self.base_model: str | None = None  # the engine's own name for its base model (its /v1/models)
        self._reverify = reverify
        self._health_interval = health_interval
        self._healthy = False
        self._synced: set[str] = set()
        self._task: asyncio.Task | None = None
        self.inflight = 0
        self.last_error: str | None = None
        self._request_timeout = request_timeout
        self._http: aiohttp.ClientSession | None = None
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(request_timeout, connect=5.0),
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256),
        )

    @property
    def ready(self) -> bool:
        return self._healthy and set(self._adapters()) <= self._synced

    async def start(self) -> None:
        self._task = asyncio.create_task(self._health_loop(), name=f"health:{self.url}")

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._client.aclose()
        if self._http is not None:
            await self._http.close()

    def mark_down(self, reason: str) -> None:
        """Forget what we knew: a restarted engine has no adapters loaded."""
        if self._healthy:
            log.warning("engine %s is down: %s", self.url, reason)
        self._healthy = False
        self._synced.clear()
        self.last_error = reason

    async def check(self) -> bool:
        """One health probe; on the way up, load every served adapter."""
        try:
            r = await self._client.get("/health", timeout=5.0)
            ok = r.status_code == 200
        except httpx.HTTPError as e:
            ok = False
            self.last_error = f"{type(e).__name__}: {e}"
        if not ok:
            self.mark_down(self.last_error or "health check failed")
            return False
        if not self._healthy:
            # The context is the engine's own (a restart may have changed it): read it
            # before the engine counts as ready, so no request runs without it.
            card = await self._base_card()
            n = card.get("max_model_len")
            self.max_model_len = n if isinstance(n, int) and n > 0 else None
            self.base_model = card.get("id")
            log.info("engine %s is healthy (base %s, context %s tokens)", self.url, self.base_model,
                     self.max_model_len)
            self._healthy = True
            self.last_error = None
        await self.sync_adapters()
        return self.ready

    async def sync_adapters(self) -> None:
        """Load every served adapter this engine lacks (it started, or restarted and lost them).

        Each one is re-verified first (`reverify`): the files are read from disk again and
        may have changed since they were promoted. A refused one stops being served, which
        changes the served set (the live alias may fall back), so the set is read again.
        """
        for _ in range(8):  # each pass that refuses one drops it from the served set
            wanted = self._adapters()
            if set(wanted) <= self._synced:
                return
            loaded = await self._loaded_models()
            changed = False
            for name, path in wanted.items():
                if name in self._synced:
                    continue
                if name not in loaded:
                    if self._reverify is not None and not self._reverify(name):
                        changed = True
                        continue
                    await self.load_adapter(name, path)
                self._synced.add(name)
            if not changed:
                return

    async def _models(self) -> list[dict[str, Any]]:
        """vLLM's /v1/models cards: the base model and every loaded adapter."""
        r = await self._client.get("/v1/models", timeout=10.0)
        r.raise_for_status()
        return r.json().get("data", [])

    async def _base_card(self) -> dict[str, Any]:
        """The base model's card (the one with no parent): its served name and `max_model_len`."""
        return next((m for m in await self._models() if m.get("parent") is None), {})

    async def _loaded_models(self) -> set[str]:
        return {m["id"] for m in await self._models()}

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep probing whatever went wrong
                self.mark_down(f"{type(e).__name__}: {e}")
            await asyncio.sleep(self._health_interval if self.ready else min(self._health_interval, 0.5))

    async def load_adapter(self, name: str, path: str) -> None:
        r = await self._client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                                    timeout=120.0)
        if r.status_code != 200 and "already been loaded" not in r.text:
            raise EngineError.from_response(r.status_code, r.content)
        self._synced.add(name)

    async def unload_adapter(self, name: str) -> None:
        r = await self._client.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60.0)
        if r.status_code != 200:
            raise EngineError.from_response(r.status_code, r.content)
        self._synced.discard(name)

    def _session(self) -> aiohttp.ClientSession:
        # aiohttp for the chat path only: it runs once per generated token, and
        # httpx/httpcore (kept for the rare admin and health calls) cost the
        # gateway several times more CPU per streamed chunk -- CPU that, on a
        # small host, the engine itself needs. Created lazily: it needs a loop.
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                base_url=self.url + "/",
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self._request_timeout, sock_connect=5.0),
                connector=aiohttp.TCPConnector(limit=2048, limit_per_host=0, keepalive_timeout=30),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                auto_decompress=False,
            )
        return self._http

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if rid := body.pop("_request_id", None):
            headers["X-Request-Id"] = rid
        stream = bool(body.get("stream"))
        served = body.get("model")
        if served in self._base_names():
            body["model"] = self.base_model  # the base version: no adapter, the bare weights
        else:
            served = None
        try:
            resp = await self._session().post("v1/chat/completions", data=orjson.dumps(body), headers=headers)
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as e:
            self.mark_down(f"{type(e).__name__}: {e}")
            raise EngineUnreachable(f"engine {self.url} unreachable") from e
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise EngineUnavailable(f"engine {self.url} failed: {type(e).__name__}") from e
        try:
            if resp.status != 200:
                raise EngineError.from_response(resp.status, await resp.read())
            if not stream:
                out = orjson.loads(await resp.read())
                if served and "model" in out:
                    out["model"] = served
                yield out
                return
            # SSE lines split on raw bytes and parsed with orjson (once per token).
            # Everything one read brought is yielded as one list: when the gateway
            # falls behind a busy engine, chunks pile up in the socket and are then
            # relayed in one write instead of one trip through the stack each.
            buf = b""
            async for raw in resp.content.iter_any():
                buf += raw
                *lines, buf = buf.split(b"\n")
                batch = []
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        if batch:
                            yield batch
                        # Read the rest (the chunked-encoding terminator) so the
                        # connection goes back to the pool instead of being dropped.
                        await resp.read()
                        return
                    chunk = orjson.loads(data)
                    if served and "model" in chunk:
                        chunk["model"] = served
                    batch.append(chunk)
                if batch:
                    yield batch
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            # The engine died mid-response: the client sees a broken stream,
            # which is the truth; the health loop notices the engine is gone.
            self.mark_down(f"{type(e).__name__}: {e}")
            raise EngineUnavailable(f"engine {self.url} failed mid-response") from e
        finally:
            resp.release()


class EnginePool:
    """Routes each request to the ready engine with the fewest in flight."""

    def __init__(self, engines: list[Engine]):
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.engines = engines

    async def start(self) -> None:
        for e in self.engines:
            await e.start()

    async def aclose(self) -> None:
        for e in self.engines:
            await e.aclose()

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.engines)

    @property
    def max_model_len(self) -> int | None:
        """The smallest context of the ready engines (a request may go to any), None if none is known."""
        lens = [e.max_model_len for e in self.engines if e.ready and e.max_model_len]
        return min(lens) if lens else None

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                return True
            await asyncio.sleep(0.2)
        return self.ready

    def _pick(self, exclude: set[int]) -> Engine | None:
        candidates = [e for e in self.engines if e.ready and id(e) not in exclude]
        return min(candidates, key=lambda e: e.inflight) if candidates else None

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        tried: set[int] = set()
        while True:
            engine = self._pick(tried)
            if engine is None:
                raise EngineUnavailable()
            tried.add(id(engine))
            engine.inflight += 1
            started = False
            try:
                async for item in engine.chat(dict(body)):
                    started = True
                    yield item
                return
            except EngineUnreachable:
                if started:
                    raise
                continue  # never reached the engine: safe to try another
            finally:
                engine.inflight -= 1

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.gather(*(e.load_adapter(name, path) for e in self.engines if e.ready))

    async def unload_adapter(self, name: str) -> None:
        await asyncio.gather(*(e.unload_adapter(name) for e in self.engines if e.ready))
