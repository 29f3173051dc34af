"""Admin HTTP endpoints: adapter versions, promotion, rollback, canary, training runs.

Thin: each route checks the admin key, parses its body, and calls the one
place that does the work (serve/adapters.py for versions, the loop for runs).

Invariant: every route requires `Authorization: Bearer <AGENTLOOP_ADMIN_KEY>`,
compared in constant time; user keys never pass, and with no admin key
configured every admin route is refused (403) rather than open.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request

from .chat import parse_body
from .errors import AuthenticationFailed, EngineUnavailable, InvalidRequest, PermissionDenied

router = APIRouter(prefix="/admin")


def require_admin(request: Request) -> None:
    key = request.app.state.gw.settings.admin_key
    if not key:
        raise PermissionDenied("Admin endpoints are disabled: set AGENTLOOP_ADMIN_KEY to enable them.")
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not token or not hmac.compare_digest(token.encode(), key.encode()):
        raise AuthenticationFailed("A valid admin key is required (Authorization: Bearer <admin key>).")


def _manager(request: Request):
    mgr = request.app.state.gw.adapters
    if mgr is None:
        raise EngineUnavailable("Adapters are not available yet; retry shortly.", retry_after=10)
    return mgr


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    return parse_body(raw) if raw.strip() else {}


def _version(body: dict[str, Any], *, required: bool = True) -> str | None:
    v = body.get("version")
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise InvalidRequest("'version' (e.g. \"v0002\") is required.", param="version")
    return v.rsplit("@", 1)[-1]


@router.get("/adapters", dependencies=[Depends(require_admin)])
async def list_adapters(request: Request):
    mgr = _manager(request)
    return {"object": "list", "data": mgr.list()}


@router.post("/promote", dependencies=[Depends(require_admin)])
async def promote(request: Request):
    body = await _body(request)
    return await _manager(request).promote(_version(body), reason=str(body.get("reason") or "promoted by admin"))


@router.post("/rollback", dependencies=[Depends(require_admin)])
async def rollback(request: Request):
    body = await _body(request)
    return await _manager(request).rollback(_version(body))


@router.post("/canary", dependencies=[Depends(require_admin)])
async def canary(request: Request):
    body = await _body(request)
    share = body.get("share", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise InvalidRequest("'share' must be a number between 0 and 1.", param="share")
    return await _manager(request).set_canary(_version(body, required=share > 0), float(share))
