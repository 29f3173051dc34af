"""Who is calling. Today: a stable, non-reversible id derived from the bearer key.

Invariant: the raw key is never stored or logged; the same key always maps to
the same caller id, so completions and feedback can be matched to their owner.
(User key management and the admin key come with the hardening issue.)
"""

from __future__ import annotations

import hashlib

from starlette.requests import Request

ANONYMOUS = "anonymous"


def caller_of(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return "key-" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:16]
    return ANONYMOUS
