"""User API keys and their SQL: a mixin that ``agentloop.serve.store.Store`` inherits.

Part of the store layer (all SQL lives in serve/store/), kept apart only to
keep files small. Portable types only (times are Float epoch seconds).

What it owns
- ``m004_api_keys``: the ``api_keys`` table (registered in serve/store/db.py after
  m003; never edit it once released: append a new migration).
- ``KeyStore``: create, list, revoke, trust/untrust keys; the active-key
  snapshot the gateway caches (serve/services/access.py); the untrusted callers the
  learning loop leaves out (rl/loop.py).
- ``hash_key`` / ``caller_for_key``: the one definition of how a raw key maps
  to its stored hash and to the caller id that owns completions and feedback.

Invariants
- The raw key is never stored: only its SHA-256 (``key_hash``), and for long
  generated keys a 4-character ``hint`` so an operator can tell keys apart.
  A key is random (``al-`` + 32 bytes of ``secrets``), so a fast hash is enough
  (no password stretching needed: there is nothing to brute-force).
- ``caller`` is ``"key-" + sha256(key)[:16]``, exactly what serve/http/auth.py
  derives from any bearer, so a managed key owns the same history it had in
  open mode, and ownership checks never need this table.
- A hash is unique across all keys, revoked ones included: a revoked key can
  never come back by being created again.
- Revoking is permanent (there is no un-revoke); trust can be flipped.

Never imports fastapi, torch or vllm, nor serve.store (which imports it).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Any

from sqlalchemy import (
    Column, Connection, Float, Index, Integer, MetaData, Table, Text, func, insert, select, update,
)
from sqlalchemy import exc as sa_exc

KEY_PREFIX = "al-"
MIN_KEY_CHARS = 16  # for imported keys (--key); generated ones are 46 characters
LIMIT_FIELDS = ("rpm", "max_streams", "max_body_bytes", "max_tokens")
# What list/get return: everything but the hash (useless to an operator, and
# one less thing to leak into a terminal or a log).
PUBLIC_FIELDS = ("id", "name", "caller", "hint", "created_at", "revoked_at", "trusted", *LIMIT_FIELDS)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


ANONYMOUS = "anonymous"  # the caller of a request with no bearer (open mode)


def caller_for_key(raw: str) -> str:
    """The caller id of a bearer key (managed or not): stable, not reversible."""
    return "key-" + hash_key(raw)[:16]


def new_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _keys_v1(md: MetaData) -> Table:
    return Table(
        "api_keys", md,
        Column("id", Text, primary_key=True),          # "key_<12 hex>": what the CLI shows and takes
        Column("name", Text, nullable=False),
        Column("key_hash", Text, nullable=False),      # sha256 hex of the raw key
        Column("caller", Text, nullable=False),        # "key-" + key_hash[:16]
        Column("hint", Text),                          # last 4 characters of a long key, or null
        Column("created_at", Float, nullable=False),
        Column("revoked_at", Float),                   # null while the key works
        Column("trusted", Integer, nullable=False),    # 0: feedback stored, never trained on
        # Per-key limits; null means the gateway's default (serve/settings.py).
        Column("rpm", Integer),
        Column("max_streams", Integer),
        Column("max_body_bytes", Integer),
        Column("max_tokens", Integer),
    )


_META = MetaData()
API_KEYS = _keys_v1(_META)


def m004_api_keys(conn: Connection) -> None:
    md = MetaData()
    t = _keys_v1(md)
    Index("ux_api_keys_key_hash", t.c.key_hash, unique=True)
    Index("ix_api_keys_caller", t.c.caller)
    md.create_all(conn)


class KeyExists(ValueError):
    """That key (or one with the same hash) was created before, perhaps revoked since."""


def _public(row: Any) -> dict[str, Any]:
    d = dict(row._mapping)
    out = {k: d.get(k) for k in PUBLIC_FIELDS}
    out["trusted"] = bool(out["trusted"])
    return out


def check_limits(limits: dict[str, int | None]) -> dict[str, int | None]:
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown limit(s): {sorted(unknown)}")
    for k, v in limits.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{k} must be a positive integer (or unset for the default)")
    return limits


class KeyStore:
    """API key SQL. A mixin: ``self._conn`` comes from agentloop.serve.store.Store."""

    def create_key(self, *, name: str, raw_key: str | None = None, trusted: bool = True,
                   **limits: int | None) -> tuple[dict[str, Any], str]:
        """Store a new key; return (its public row, the raw key). The raw key is
        generated unless given, and is never stored: show it to the user once.

        Raises KeyExists if the key was ever created before, ValueError for a
        bad name, a short imported key or a bad limit.
        """
        if not name or not name.strip() or len(name) > 200:
            raise ValueError("a key needs a name of 1..200 characters")
        check_limits(limits)
        raw = raw_key if raw_key is not None else new_raw_key()
        if len(raw) < MIN_KEY_CHARS or raw != raw.strip() or any(c.isspace() for c in raw):
            raise ValueError(f"a key must be at least {MIN_KEY_CHARS} characters without spaces")
        digest = hash_key(raw)
        row = {"id": f"key_{uuid.uuid4().hex[:12]}", "name": name.strip(), "key_hash": digest,
               "caller": "key-" + digest[:16], "hint": raw[-4:] if len(raw) >= 24 else None,
               "created_at": time.time(), "revoked_at": None, "trusted": int(trusted),
               **{k: limits.get(k) for k in LIMIT_FIELDS}}
        try:
            with self._conn(write=True) as conn:  # type: ignore[attr-defined]
                if conn.execute(select(API_KEYS.c.id).where(API_KEYS.c.key_hash == digest)).first():
                    raise KeyExists("this key already exists (or was revoked); generate a new one")
                conn.execute(insert(API_KEYS).values(**row))
        except sa_exc.IntegrityError:
            # A concurrent creator of the same key won between check and insert.
            raise KeyExists("this key already exists (or was revoked); generate a new one") from None
        return self.get_key(row["id"]), raw

    def get_key(self, key_id: str) -> dict[str, Any] | None:
        with self._conn() as conn:  # type: ignore[attr-defined]
            row = conn.execute(select(API_KEYS).where(API_KEYS.c.id == key_id)).first()
        return _public(row) if row is not None else None

    def list_keys(self, *, include_revoked: bool = True) -> list[dict[str, Any]]:
        q = select(API_KEYS).order_by(API_KEYS.c.created_at, API_KEYS.c.id)
        if not include_revoked:
            q = q.where(API_KEYS.c.revoked_at.is_(None))
        with self._conn() as conn:  # type: ignore[attr-defined]
            return [_public(r) for r in conn.execute(q)]

    def _change(self, key_id: str, **values: Any) -> dict[str, Any]:
        with self._conn(write=True) as conn:  # type: ignore[attr-defined]
            got = conn.execute(update(API_KEYS).where(API_KEYS.c.id == key_id).values(**values))
            if got.rowcount == 0:
                raise KeyError(key_id)
        return self.get_key(key_id)  # type: ignore[return-value]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key (idempotent: the first revocation time stays). KeyError if unknown."""
        key = self.get_key(key_id)
        if key is None:
            raise KeyError(key_id)
        if key["revoked_at"] is not None:
            return key
        return self._change(key_id, revoked_at=time.time())

    def set_key_trusted(self, key_id: str, trusted: bool) -> dict[str, Any]:
        return self._change(key_id, trusted=int(trusted))

    def set_key_limits(self, key_id: str, **limits: int | None) -> dict[str, Any]:
        return self._change(key_id, **check_limits(limits))

    def key_snapshot(self) -> list[dict[str, Any]]:
        """Every key with its hash, revoked ones included: what the gateway's key
        cache holds (it serves the active ones and remembers the revoked hashes)."""
        with self._conn() as conn:  # type: ignore[attr-defined]
            return [{**_public(r), "key_hash": r.key_hash} for r in conn.execute(select(API_KEYS))]

    def count_active_keys(self) -> int:
        q = select(func.count()).select_from(API_KEYS).where(API_KEYS.c.revoked_at.is_(None))
        with self._conn() as conn:  # type: ignore[attr-defined]
            return int(conn.execute(q).scalar_one())

    def key_by_hash(self, digest: str) -> dict[str, Any] | None:
        """The key (revoked or not) with this hash, if any."""
        with self._conn() as conn:  # type: ignore[attr-defined]
            row = conn.execute(select(API_KEYS).where(API_KEYS.c.key_hash == digest)).first()
        return _public(row) if row is not None else None

    def untrusted_callers(self) -> list[str]:
        """Caller ids of keys marked untrusted (revoked or not): the loop never trains on them."""
        q = select(API_KEYS.c.caller).where(API_KEYS.c.trusted == 0).order_by(API_KEYS.c.caller)
        with self._conn() as conn:  # type: ignore[attr-defined]
            return list(dict.fromkeys(conn.execute(q).scalars()))
