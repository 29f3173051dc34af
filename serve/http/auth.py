"""Who is calling: a stable, non-reversible id derived from the bearer key.

Invariant: the raw key is never stored or logged; the same key always maps to
the same caller id (``agentloop.serve.store.keys.caller_for_key``), managed key or open
mode alike, so completions and feedback can be matched to their owner and a
key created for an existing bearer keeps its history. Whether a key may call
at all, and how much, is serve/services/access.py's business (it runs before routes).
"""

from __future__ import annotations

from starlette.requests import Request

from agentloop.serve.store.keys import ANONYMOUS, caller_for_key



def caller_of(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return caller_for_key(auth[7:].strip())
    return ANONYMOUS
