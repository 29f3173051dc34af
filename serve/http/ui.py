"""The web UI: a feedback chat page at `/` and the loop dashboard at `/admin`.

What it owns
- The pages (Jinja templates in serve/ui/templates), their script and style
  (serve/ui/static, under `/ui/static/`), and the vendored charting library
  (Chart.js, installed by `.ci/ui-assets` into the git-ignored
  serve/ui/vendor/node_modules, under `/ui/vendor/`).
- `GET /admin/stats`: the aggregate numbers no other endpoint gives (feedback
  by kind and version, thumbs rate per version, the alias's traffic split),
  from the store's StatsStore mixin (serve/store/stats.py).
- `login_page`, which serve/http/admin.py's login route renders on a refused key.

Invariants
- The pages are shells: everything they show or change goes through the
  public HTTP API (`/v1/models`, `/v1/chat/completions`, `/v1/feedback`,
  `/admin/*`) with the user's key or the admin session — no private back door.
- Everything a page loads is served by the gateway (a Content-Security-Policy
  of 'self' enforces it); a missing vendored library is said on the page, not
  fetched from the internet.
- `/admin` shows the dashboard only to an admin (Bearer header or session
  cookie, the same `require_admin` check as every admin route); anyone else
  gets the login form.
- Static routes serve only files inside their folder (no path escapes).

Never imports torch or vllm.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse

from agentloop.serve.http import admin_auth as admin
from agentloop.serve.errors import AgentloopError, NotFound

UI_DIR = Path(__file__).with_name("ui")
STATIC_DIR = UI_DIR / "static"
VENDOR_DIR = UI_DIR / "vendor" / "node_modules"  # npm's layout under `--prefix serve/ui/vendor`
CHART_JS = "chart.js/dist/chart.umd.min.js"  # self-contained UMD build: one file, no imports
ASSETS_HINT = "run `bash .ci/ui-assets` (npm) and reload"

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(UI_DIR / "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined)

# 'self' only: the pages must work offline, and injected markup cannot load or
# run anything foreign. Chart.js sizes its canvas through inline styles.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

router = APIRouter()


def chart_js_present() -> bool:
    return (VENDOR_DIR / CHART_JS).is_file()


def _page(template: str, *, status_code: int = 200, **ctx) -> HTMLResponse:
    html = _env.get_template(template).render(**ctx)
    return HTMLResponse(html, status_code=status_code, headers={
        "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
        # Pages embed no secrets, but the dashboard reflects admin state: never cache it.
        "Cache-Control": "no-store", "Referrer-Policy": "same-origin"})


def login_page(request: Request, *, error: str | None = None, notice: str | None = None,
               status_code: int = 200) -> HTMLResponse:
    enabled = bool(request.app.state.gw.settings.admin_key)
    return _page("login.html", status_code=status_code, title="agentloop admin", page="admin",
                 error=error, notice=notice, enabled=enabled)


@router.get("/", response_class=HTMLResponse)
async def chat_page(request: Request):
    return _page("chat.html", title="agentloop chat", page="chat", alias=request.app.state.gw.settings.alias)


@router.get("/admin", response_class=HTMLResponse)
async def dashboard_page(request: Request):
    try:
        admin.require_admin(request)
    except AgentloopError as e:
        if not request.app.state.gw.settings.admin_key:
            return login_page(request, error=e.message, status_code=e.status)
        if request.headers.get("authorization"):
            return login_page(request, error="Wrong admin key: access refused.", status_code=e.status)
        if request.cookies.get(admin.SESSION_COOKIE):
            return login_page(request, notice="Your session has ended (it expired or the admin key changed); "
                                              "log in again.")
        return login_page(request)
    return _page("dashboard.html", title="agentloop dashboard", page="admin",
                 alias=request.app.state.gw.settings.alias, chart_js=CHART_JS if chart_js_present() else None,
                 assets_hint=ASSETS_HINT)


def _rate(up: int, down: int) -> float | None:
    return up / (up + down) if up + down else None


@router.get("/admin/stats", dependencies=[Depends(admin.require_admin)])
async def stats(request: Request, window: float = 3600.0):
    """Feedback volume by kind and version, thumbs rate per version, grades per version and
    grader (how many, how many failed, the mean score), and how the alias's traffic split over
    versions in the last `window` seconds (the observed canary share)."""
    gw = request.app.state.gw
    window = min(max(window, 60.0), 90 * 86400.0)
    since = time.time() - window
    fb, grades, traffic, recent = await asyncio.gather(
        asyncio.to_thread(gw.store.feedback_stats), asyncio.to_thread(gw.store.grade_summary),
        asyncio.to_thread(gw.store.traffic_stats),
        asyncio.to_thread(gw.store.traffic_stats, model=gw.router.alias, since=since))
    total = sum(r["count"] for r in recent)
    return {
        "object": "stats",
        "feedback": fb["by_type"],
        "thumbs": [{**r, "rate": _rate(r["up"], r["down"])} for r in fb["thumbs"]],
        "grades": grades,
        "traffic": traffic,
        "alias_traffic": {"alias": gw.router.alias, "window_seconds": window,
                          "versions": [{**r, "share": r["count"] / total} for r in recent]},
    }


def _file(base: Path, path: str, missing: str) -> FileResponse:
    root = base.resolve()
    try:
        target = (root / path).resolve()
        # resolve() folds "..", so anything outside the folder is refused here.
        found = target.is_relative_to(root) and target.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: no such file
        found = False
    if not found:
        raise NotFound(missing, code="not_found")
    # Revalidate every time: a redeploy or `.ci/ui-assets` run must show at once.
    return FileResponse(target, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/ui/static/{path:path}")
async def static_file(path: str):
    return _file(STATIC_DIR, path, f"No UI file {path!r}.")


@router.get("/ui/vendor/{path:path}")
async def vendor_file(path: str):
    return _file(VENDOR_DIR, path, f"No vendored asset {path!r}: {ASSETS_HINT}.")
