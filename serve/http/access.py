"""The /v1 access middleware: authenticate, rate-limit and bound the body of every request.

The rules (keys, open mode, limits) are serve/services/access.py's `Access`;
this module applies them to ASGI requests and answers refusals in OpenAI's
shape: 401 invalid_api_key, 413 request_too_large, 429 rate_limit_exceeded with
Retry-After. A body is never read past the caller's limit (Content-Length is
checked before reading, and the bytes are counted as they arrive), and nothing
is done per streamed chunk (``send`` is never wrapped). /health, /metrics, the
UI pages and /admin (serve/http/admin.py has its own key) are not touched here.

Never imports torch or vllm.
"""

from __future__ import annotations

from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse

from agentloop.serve.errors import AgentloopError, EngineUnavailable, RateLimited, RequestTooLarge
from agentloop.serve.services.access import CHAT_PATH, PRINCIPAL, Access, Principal, too_large


def _bounded(receive, limit: int):
    """`receive` that raises RequestTooLarge once more than `limit` body bytes arrived.

    The raise happens inside the route's `await request.body()`, so the app's
    AgentloopError handler answers it (413) like any other domain error."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body") or b"")
            if seen > limit:
                raise too_large(limit)
        return message

    return wrapped


async def _refuse(scope, receive, send, err: AgentloopError) -> None:
    await JSONResponse(err.to_openai(), status_code=err.status, headers=err.headers())(scope, receive, send)


class AccessMiddleware:
    """Pure ASGI middleware for /v1/*: authenticate, rate-limit, bound the body.

    Pure ASGI rather than BaseHTTPMiddleware: the latter re-streams every
    response through a memory channel, a cost on each streamed token."""

    def __init__(self, app, access: Callable[[], Access | None]):
        self.app = app
        self.access = access  # the gateway's Access once it started, else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        access = self.access()
        if access is None:  # only before the lifespan started
            await _refuse(scope, receive, send, EngineUnavailable("The gateway is starting; retry shortly."))
            return
        try:
            p = access.admit(scope)
        except AgentloopError as e:
            await _refuse(scope, receive, send, e)
            return
        scope[PRINCIPAL] = p
        counted = scope["path"] == CHAT_PATH and scope.get("method") == "POST"
        if counted:
            try:
                access.limiter.enter(p.caller, p.limits.max_streams)
            except RateLimited as e:
                await _refuse(scope, receive, send, e)
                return
        try:
            await self.app(scope, _bounded(receive, p.limits.max_body_bytes), send)
        finally:
            if counted:
                access.limiter.leave(p.caller)


def token_ceiling(request: Request, default: int | None) -> int | None:
    """The caller's max_tokens ceiling: their key's, else the gateway's default."""
    p: Principal | None = request.scope.get(PRINCIPAL)
    return p.limits.max_tokens if p is not None else default
