"""Admin HTTP endpoints: adapter versions, promotion, rollback, canary, training runs, graders.

Thin: each route checks the admin key, parses its body, and calls the one
place that does the work (serve/engine/adapters.py for versions, serve/services/loop.py for runs,
serve/services/grading.py for grades).

Invariant: every route requires `Authorization: Bearer <AGENTLOOP_ADMIN_KEY>`,
compared in constant time, or the dashboard's session cookie; user
keys never pass, and with no admin key configured every admin route is
refused (403) rather than open.

Who is an admin (the key, the session cookie) is serve/http/admin_auth.py.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from agentloop.rl.versions import version_of
from agentloop.serve.errors import AuthenticationFailed, EngineUnavailable, InvalidRequest, NotFound, PermissionDenied
from agentloop.serve.http.admin_auth import SESSION_COOKIE, SESSION_SECONDS, require_admin, session_token
from agentloop.serve.http.ui import login_page
from agentloop.serve.protocol import parse_body

router = APIRouter(prefix="/admin")


async def _login_key(request: Request) -> tuple[str, bool]:
    """The key a login request carries, and whether the caller wants JSON back."""
    raw = await request.body()
    if len(raw) > 4096:  # a key, not a document
        raise InvalidRequest("The login request is too large.")
    if "json" in request.headers.get("content-type", ""):
        body = parse_body(raw)
        return str(body.get("key") or ""), True
    return (parse_qs(raw.decode("utf-8", "replace")).get("key") or [""])[0], False


@router.post("/login")
async def login(request: Request):
    """Exchange the admin key for a session cookie: a form (people) or JSON `{"key"}`."""
    key = request.app.state.gw.settings.admin_key
    given, wants_json = await _login_key(request)
    gate = request.app.state.gw.access
    if gate is not None and gate.keys.key_id_of(given.strip()):
        given = ""  # a user key never logs in, not even one equal to the admin key
    if not key or not given.strip() or not hmac.compare_digest(given.strip().encode(), key.encode()):
        message = ("Admin endpoints are disabled: set AGENTLOOP_ADMIN_KEY to enable them." if not key
                   else "Wrong admin key: access refused.")
        status = 403 if not key else 401
        if wants_json:
            err = PermissionDenied(message) if not key else AuthenticationFailed(message)
            return JSONResponse(err.to_openai(), status_code=status)
        return login_page(request, error=message, status_code=status)
    expires = int(time.time()) + SESSION_SECONDS
    resp: Response = (JSONResponse({"object": "admin_session", "expires_at": expires}) if wants_json
                      else RedirectResponse("/admin", status_code=303))
    resp.set_cookie(SESSION_COOKIE, session_token(key, expires), max_age=SESSION_SECONDS, path="/admin",
                    httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/logout")
async def logout(request: Request):
    """Forget the session cookie in this browser (other sessions end at their expiry)."""
    resp = RedirectResponse("/admin", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/admin", httponly=True, samesite="strict",
                       secure=request.url.scheme == "https")
    return resp


def _manager(request: Request):
    mgr = request.app.state.gw.adapters
    if mgr is None or not mgr.bound:
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
    return version_of(v)  # the served name "agentloop@v0002" works too


@router.get("/adapters", dependencies=[Depends(require_admin)])
async def list_adapters(request: Request):
    mgr = _manager(request)
    return {"object": "list", "data": mgr.list()}


@router.get("/models", dependencies=[Depends(require_admin)])
async def list_models(request: Request):
    """`GET /v1/models` for the dashboard: its session cookie is scoped to /admin, and
    with API keys in use /v1 takes user keys only."""
    return {"object": "list", "data": request.app.state.gw.router.list_models()}


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


def _grading(request: Request):
    grading = request.app.state.gw.grading
    if grading is None:
        raise EngineUnavailable("The gateway is starting; retry shortly.", retry_after=5)
    return grading


@router.get("/graders", dependencies=[Depends(require_admin)])
async def list_graders(request: Request):
    """The deployment's graders, in order, with their options."""
    return {"object": "list", "data": _grading(request).describe()}


@router.post("/grade", dependencies=[Depends(require_admin)])
async def grade(request: Request):
    """Grade a logged completion with every grader that applies (`reference`: an assistant message
    to grade against; without it, the newest reference feedback on the completion). Stored."""
    body = await _body(request)
    unknown = body.keys() - {"completion_id", "reference"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unrecognized request argument supplied: {name}.", param=name)
    return await asyncio.to_thread(_grading(request).grade, body.get("completion_id"), body.get("reference"))


@router.get("/grades", dependencies=[Depends(require_admin)])
async def list_grades(request: Request, completion_id: str | None = None, version: str | None = None,
                      grader: str | None = None, limit: int = 100):
    """Stored grades, newest first, by completion, served version or grader."""
    store = request.app.state.gw.store
    rows = await asyncio.to_thread(store.list_grades, completion_id=completion_id,
                                   version=version and version_of(version), grader=grader,
                                   limit=max(1, min(limit, 1000)))
    return {"object": "list", "data": [{"object": "grade", **r} for r in rows]}
