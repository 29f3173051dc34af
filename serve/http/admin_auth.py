"""Who is an admin: the admin key as a Bearer header, or the dashboard's session cookie.

Invariant: `require_admin` (a FastAPI dependency of every /admin route and the
dashboard page) accepts `Authorization: Bearer <AGENTLOOP_ADMIN_KEY>`, compared
in constant time, or a valid session cookie; user keys never pass, and with no
admin key configured everything is refused (403) rather than open.

Session cookie (for people; scripts use the header): `POST /admin/login` with
the admin key sets `agentloop_admin` = "<expiry>.<HMAC-SHA256(admin key,
expiry)>", HttpOnly, SameSite=Strict, Path=/admin. Nothing is stored server
side: changing the admin key ends every session; a cookie is good until its
expiry. A Bearer header, when sent, decides alone (a script's wrong key is
never rescued by a browser cookie), and a cookie-authenticated write must come
from the gateway's own origin.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

from fastapi import Request

from agentloop.serve.errors import AuthenticationFailed, PermissionDenied

SESSION_COOKIE = "agentloop_admin"
SESSION_SECONDS = 12 * 3600


def session_token(key: str, expires: int) -> str:
    """The cookie value for a session ending at `expires` (epoch seconds)."""
    mac = hmac.new(key.encode(), f"agentloop-admin-session:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def session_valid(value: str | None, key: str, now: float | None = None) -> bool:
    expires, _, _ = (value or "").partition(".")
    if not expires.isdigit() or int(expires) <= (time.time() if now is None else now):
        return False
    return hmac.compare_digest(value.encode(), session_token(key, int(expires)).encode())


def _same_origin(request: Request) -> bool:
    # SameSite=Strict keeps other sites' requests cookie-less, but "site" ignores
    # the port: a page on another localhost port is same-site. Browsers send
    # Origin on every cross-origin write, so a foreign one is refused.
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def require_admin(request: Request) -> None:
    key = request.app.state.gw.settings.admin_key
    if not key:
        raise PermissionDenied("Admin endpoints are disabled: set AGENTLOOP_ADMIN_KEY to enable them.")
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    gate = request.app.state.gw.access
    user_key = gate.keys.key_id_of(token) if gate is not None and token else None
    if user_key is not None:
        # Checked before the admin key: a user key that equals the admin key
        # (created by mistake) is known to a user, so it must not open /admin.
        if hmac.compare_digest(token.encode(), key.encode()):
            raise PermissionDenied(f"This admin key is also user API key {user_key}, so admin endpoints refuse it: "
                                   "set a different AGENTLOOP_ADMIN_KEY.")
        raise PermissionDenied("User API keys cannot use admin endpoints: send the admin key "
                               "(AGENTLOOP_ADMIN_KEY) as Authorization: Bearer, or log in at /admin.")
    if token and hmac.compare_digest(token.encode(), key.encode()):
        return
    if not token and session_valid(request.cookies.get(SESSION_COOKIE), key):
        if request.method in ("GET", "HEAD") or _same_origin(request):
            return
        raise PermissionDenied("Cross-origin admin requests are refused.")
    raise AuthenticationFailed("A valid admin key is required (Authorization: Bearer <admin key>, "
                               "or log in at /admin).")
