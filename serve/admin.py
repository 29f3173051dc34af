"""Admin HTTP endpoints: adapter versions, promotion, rollback, canary, training runs.

Thin: each route checks the admin key, parses its body, and calls the one
place that does the work (serve/adapters.py for versions, the loop for runs).

Invariant: every route requires `Authorization: Bearer <AGENTLOOP_ADMIN_KEY>`,
compared in constant time; user keys never pass, and with no admin key
configured every admin route is refused (403) rather than open.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request

from .chat import parse_body
from .errors import AuthenticationFailed, EngineUnavailable, InvalidRequest, NotFound, PermissionDenied

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


@router.post("/train", dependencies=[Depends(require_admin)])
async def train(request: Request):
    """Start one full iteration now: dataset, training, gate, and promotion unless promote=false."""
    body = await _body(request)
    promote = body.get("promote", True)
    if not isinstance(promote, bool):
        raise InvalidRequest("'promote' must be true or false.", param="promote")
    method = body.get("method")
    if method is not None and method not in ("dpo", "kto"):
        raise InvalidRequest("'method' must be 'dpo' or 'kto'.", param="method")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("'params' must be an object.", param="params")
    run = await request.app.state.gw.loop.start(trigger="admin", method=method, promote=promote, params=params)
    return {"id": run["id"], "object": "training_run", "status": run["status"]}


def _run_view(run: dict, metrics: list[dict] | None = None) -> dict:
    out = {"object": "training_run", **run}
    out.pop("owner", None)
    if metrics is not None:
        out["metrics"] = metrics
    return out


@router.get("/runs", dependencies=[Depends(require_admin)])
async def list_runs(request: Request, limit: int = 20):
    store = request.app.state.gw.store
    runs = await asyncio.to_thread(store.list_runs, limit=max(1, min(limit, 200)))
    return {"object": "list", "data": [_run_view(r) for r in runs]}


@router.get("/runs/{run_id}", dependencies=[Depends(require_admin)])
async def get_run(request: Request, run_id: str):
    store = request.app.state.gw.store
    run = await asyncio.to_thread(store.get_run, run_id)
    if run is None:
        raise NotFound(f"No training run {run_id!r}.", param="run_id", code="run_not_found")
    return _run_view(run, await asyncio.to_thread(store.run_metrics, run_id))
