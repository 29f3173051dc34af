"""Who may call /v1, and how much: API keys, open mode, and per-key limits.

What it owns
- The access mode. With at least one active API key in the store, every /v1
  request needs a valid, unrevoked key (else 401). With none, /v1 is *open*
  (any bearer or none; the caller is derived from the bearer, serve/http/auth.py)
  only when the gateway binds to a loopback address or open mode was chosen
  (`AGENTLOOP_OPEN=true`, `agentloop serve --open`); binding elsewhere with no
  key and no open mode refuses to start (``check_startup``), and if every key
  is revoked while such a gateway runs, /v1 answers 401 — it never falls open.
- ``KeyCache``: the keys, re-read from the store by one background task every
  ``keys_refresh_seconds``, so created and revoked keys take effect within
  that, whoever changed them (the CLI writes the store directly).
- ``Limiter``: per caller, requests per minute (a token bucket) and chat
  completions in flight. The HTTP edge applies them (serve/http/access.py:
  ``AccessMiddleware`` with the body-size limit; the chat service the
  max_tokens ceiling, serve/services/chat.py).

Invariants
- The request path never queries the store: lookups read the cached snapshot.
  Nothing is done per streamed chunk (``send`` is never wrapped).
- A body is never read past the caller's limit: Content-Length is checked
  before reading, and the bytes are counted as they arrive (chunked bodies).
- Limiter state is in memory, per gateway process (with several gateways each
  enforces the limits on its own), and bounded: at most ``MAX_TRACKED``
  callers' buckets (least recently seen dropped first) and one counter per
  caller with requests in flight.
- Every refusal is OpenAI-shaped: 401 invalid_api_key, 413
  request_too_large, 429 rate_limit_exceeded with Retry-After.
- /health, /metrics, the UI pages and /admin (serve/http/admin.py has its own key)
  are not touched here.

Never imports torch or vllm.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from agentloop.serve.errors import (
    AgentloopError, AuthenticationFailed, EngineUnavailable, InvalidRequest, RateLimited,
    RequestTooLarge, StoreUnavailable,
)
from agentloop.serve.store.keys import ANONYMOUS, caller_for_key, hash_key

log = logging.getLogger("agentloop.access")

PRINCIPAL = "agentloop.principal"  # the ASGI scope key the middleware leaves for the routes
MAX_TRACKED = 50_000
CHAT_PATH = "/v1/chat/completions"


class StartupRefused(RuntimeError):
    """The gateway would be open to the network without keys; it will not start."""


def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def refusal(host: str, open_mode: bool, active_keys: int) -> str | None:
    """Why a gateway bound to `host` must not start, or None if it may."""
    if active_keys or open_mode or is_loopback(host):
        return None
    return (f"refusing to serve on {host} without API keys: anyone who can reach it could use the model and "
            "feed the learning loop. Create a key first (`agentloop keys create --name NAME`), bind to "
            "127.0.0.1, or choose open mode explicitly (`agentloop serve --open` / AGENTLOOP_OPEN=true).")


def check_startup(host: str, open_mode: bool, active_keys: int) -> str:
    """The access mode for a gateway bound to `host`; StartupRefused if it must not start."""
    if (why := refusal(host, open_mode, active_keys)) is not None:
        raise StartupRefused(why)
    if active_keys:
        return "keys"
    if is_loopback(host):
        return "open"
    log.warning("!" * 72)
    log.warning("OPEN MODE on %s: no API keys exist, so ANYONE who can reach this address can use the model, "
                "send feedback and influence training. Create a key (`agentloop keys create --name NAME`) "
                "to close it.", host)
    log.warning("!" * 72)
    return "open"


@dataclass(frozen=True)
class Limits:
    rpm: int
    max_streams: int
    max_body_bytes: int
    max_tokens: int | None  # None: the context length is the only bound


@dataclass(frozen=True)
class Principal:
    caller: str
    limits: Limits
    key_id: str | None = None  # None in open mode
    trusted: bool = True


def default_limits(settings) -> Limits:
    return Limits(rpm=settings.limit_rpm, max_streams=settings.limit_streams,
                  max_body_bytes=settings.limit_body_bytes, max_tokens=settings.limit_max_tokens)


def bearer(headers: list[tuple[bytes, bytes]] | Any) -> str:
    """The token of an `Authorization: Bearer …` header, or ""."""
    for k, v in headers:
        if k.lower() == b"authorization":
            value = v.decode("latin-1")
            return value[7:].strip() if value[:7].lower() == "bearer " else ""
    return ""


# ---------------------------------------------------------------- keys

class KeyCache:
    """The store's keys, as of the last refresh. Read on the event loop, replaced whole."""

    def __init__(self, store, defaults: Limits):
        self.store = store
        self.defaults = defaults
        self.active: dict[str, Principal] = {}  # key hash -> who that key is
        self.known: dict[str, str] = {}         # key hash -> key id, revoked keys too
        self.loaded_at: float | None = None

    def refresh(self) -> None:
        """Blocking (one SELECT): call it from a thread."""
        rows = self.store.key_snapshot()
        d = self.defaults
        active = {}
        for r in rows:
            if r["revoked_at"] is None:
                active[r["key_hash"]] = Principal(
                    caller=r["caller"], key_id=r["id"], trusted=r["trusted"],
                    limits=Limits(rpm=r["rpm"] or d.rpm, max_streams=r["max_streams"] or d.max_streams,
                                  max_body_bytes=r["max_body_bytes"] or d.max_body_bytes,
                                  max_tokens=r["max_tokens"] or d.max_tokens))
        self.active, self.known = active, {r["key_hash"]: r["id"] for r in rows}
        self.loaded_at = time.monotonic()

    def lookup(self, token: str) -> Principal | None:
        return self.active.get(hash_key(token)) if token else None

    def key_id_of(self, token: str) -> str | None:
        """The id of the user key (active or revoked) equal to `token`, if there is one."""
        return self.known.get(hash_key(token)) if token else None


# ---------------------------------------------------------------- limits

class Limiter:
    """Requests per minute (token buckets) and requests in flight, per caller.

    Used from the event loop only, so it needs no lock. A bucket holds up to
    `rpm` tokens (the burst) and refills at rpm/60 per second; a request takes one.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_tracked: int = MAX_TRACKED):
        self.clock = clock
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # caller -> [tokens, at]
        self.inflight: dict[str, int] = {}

    def take(self, caller: str, rpm: int) -> None:
        now = self.clock()
        b = self._buckets.get(caller)
        if b is None:
            b = self._buckets[caller] = [float(rpm), now]
            if len(self._buckets) > self.max_tracked:
                # Forgetting a caller only refills its bucket: errs towards letting through.
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
            b[0] = min(float(rpm), b[0] + max(0.0, now - b[1]) * rpm / 60.0)
            b[1] = now
        if b[0] < 1.0:
            wait = math.ceil((1.0 - b[0]) * 60.0 / rpm)
            raise RateLimited(f"Rate limit reached: this key may send {rpm} requests per minute. "
                              f"Retry in {wait} s.", retry_after=wait, limit=rpm, remaining=0)
        b[0] -= 1.0

    def enter(self, caller: str, max_streams: int) -> None:
        n = self.inflight.get(caller, 0)
        if n >= max_streams:
            # No way to know when one ends; 1 s is a polite, short retry.
            raise RateLimited(f"Too many requests at once: this key may have {max_streams} chat completions "
                              "in flight. Retry when one has finished.", retry_after=1)
        self.inflight[caller] = n + 1

    def leave(self, caller: str) -> None:
        n = self.inflight.get(caller, 0) - 1
        if n > 0:
            self.inflight[caller] = n
        else:
            self.inflight.pop(caller, None)


# ---------------------------------------------------------------- the gate keeper

class Access:
    """The access state of one gateway: its mode rules, the key cache, the limiter."""

    def __init__(self, settings, store, *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.defaults = default_limits(settings)
        self.keys = KeyCache(store, self.defaults)
        self.limiter = Limiter(clock=clock)
        self.open_allowed = settings.open or is_loopback(settings.host)
        self._admin_clash: str | None = None

    def start(self) -> str:
        """Load the keys and apply the startup rule (blocking; StartupRefused). Returns the mode."""
        self.keys.refresh()
        mode = check_startup(self.settings.host, self.settings.open, len(self.keys.active))
        self._check_admin_clash()
        log.info("access: %s mode (%d active API keys)", mode, len(self.keys.active))
        return mode

    async def run(self) -> None:
        """Re-read the keys every keys_refresh_seconds, for ever (a gateway task)."""
        while True:
            await asyncio.sleep(self.settings.keys_refresh_seconds)
            try:
                await asyncio.to_thread(self.keys.refresh)
                self._check_admin_clash()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:  # the store logged why; an outage is not a bug to trace
                log.warning("could not re-read the API keys (database unavailable); keeping the previous set")
            except Exception:  # noqa: BLE001 - a busy store: keep the last snapshot
                log.exception("could not re-read the API keys; keeping the previous set")

    def _check_admin_clash(self) -> None:
        admin = self.settings.admin_key
        clash = self.keys.key_id_of(admin) if admin else None
        if clash and clash != self._admin_clash:
            log.error("AGENTLOOP_ADMIN_KEY is also user API key %s: admin endpoints refuse it until the admin key "
                      "is changed (user keys never pass as admin).", clash)
        self._admin_clash = clash

    @property
    def keys_required(self) -> bool:
        return bool(self.keys.active) or not self.open_allowed

    @property
    def mode(self) -> str:
        return "keys" if self.keys_required else "open"

    def authenticate(self, token: str) -> Principal:
        if not self.keys_required:
            return Principal(caller=caller_for_key(token) if token else ANONYMOUS, limits=self.defaults)
        if not self.keys.active:
            raise AuthenticationFailed("No API key is active on this gateway: an operator must create one "
                                       "(`agentloop keys create --name NAME`).")
        if not token:
            raise AuthenticationFailed("You didn't provide an API key. Send it in the Authorization header "
                                       "(Authorization: Bearer YOUR_KEY); keys come from `agentloop keys create`.")
        p = self.keys.lookup(token)
        if p is not None:
            return p
        raise AuthenticationFailed("Incorrect API key provided, or the key was revoked.")

    def admit(self, scope: dict) -> Principal:
        """Who is calling, if they may, and charge one request to their rate (raises)."""
        headers = scope.get("headers") or []
        p = self.authenticate(bearer(headers))
        self.limiter.take(p.caller, p.limits.rpm)
        for k, v in headers:
            if k.lower() == b"content-length":
                try:
                    size = int(v)
                except ValueError:
                    raise InvalidRequest("The Content-Length header is not a number.") from None
                if size > p.limits.max_body_bytes:
                    raise too_large(p.limits.max_body_bytes)
        return p


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this key's limit of {limit} bytes.")
