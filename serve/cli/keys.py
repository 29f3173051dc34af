"""`agentloop keys create | list | revoke | trust | untrust | limits`: user API keys.

These work on the store itself (the gateway's SQLite file under AGENTLOOP_HOME,
or AGENTLOOP_DATABASE_URL / --database-url), not through the gateway, so they
work whether or not a gateway runs; a running gateway re-reads the keys every
AGENTLOOP_KEYS_REFRESH_SECONDS (1 s by default).

Invariants: the raw key is printed once, by `create`, on stdout and alone on
its line (so `KEY=$(agentloop keys create --name x)` works); it is never
stored or printed again. Nothing here imports torch, vllm or fastapi.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import time

from agentloop.serve.cli.admin import CliError


def _store(args):
    from agentloop.serve.settings import Settings
    from agentloop.serve.store.db import Store

    overrides = {k: v for k, v in {"home": args.home, "database_url": args.database_url}.items() if v}
    settings = Settings(**overrides)
    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    return settings, Store(settings.db_url)


def _limits(args) -> dict[str, int]:
    return {k: v for k, v in {"rpm": args.rpm, "max_streams": args.max_streams,
                              "max_body_bytes": args.max_body_bytes, "max_tokens": args.max_tokens}.items()
            if v is not None}


def _describe(key: dict) -> str:
    status = "revoked" if key["revoked_at"] else "active"
    trust = "trusted" if key["trusted"] else "UNTRUSTED"
    limits = " ".join(f"{k}={key[k]}" for k in ("rpm", "max_streams", "max_body_bytes", "max_tokens")
                      if key[k] is not None) or "default limits"
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(key["created_at"]))
    hint = f"…{key['hint']}" if key["hint"] else "-"
    return f"{key['id']}  {status:<7}  {trust:<9}  {key['caller']}  {hint:<6}  {created}  {key['name']!r}  {limits}"


def cmd_create(args) -> int:
    settings, store = _store(args)
    try:
        admin = settings.admin_key
        if args.key is not None and admin and hmac.compare_digest(args.key.encode(), admin.encode()):
            raise CliError("refusing to create a user key equal to AGENTLOOP_ADMIN_KEY: user keys must never "
                           "open admin endpoints")
        first = store.count_active_keys() == 0
        try:
            key, raw = store.create_key(name=args.name, raw_key=args.key, trusted=not args.untrusted,
                                        **_limits(args))
        except ValueError as e:  # KeyExists too
            raise CliError(str(e)) from None
        if admin and hmac.compare_digest(raw.encode(), admin.encode()):  # pragma: no cover - 256 random bits
            store.revoke_key(key["id"])
            raise CliError("the generated key equals the admin key; it was revoked, run the command again")
    finally:
        store.close()
    print(raw)
    print(f"created {_describe(key)}", file=sys.stderr)
    print("This is the only time the key is shown: store it now.", file=sys.stderr)
    if first:
        print("It is the first active key: from now on every /v1 request needs a valid key "
              f"(a running gateway notices within {settings.keys_refresh_seconds:g} s).", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    _, store = _store(args)
    try:
        keys = store.list_keys(include_revoked=not args.active)
    finally:
        store.close()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    if not keys:
        print("no API keys: /v1 is open on loopback addresses (and with --open) only", file=sys.stderr)
    for k in keys:
        print(_describe(k))
    return 0


def _change(args, fn_name: str, **kw) -> int:
    _, store = _store(args)
    try:
        try:
            key = getattr(store, fn_name)(args.key_id, **kw)
        except KeyError:
            raise CliError(f"no API key {args.key_id!r} (see `agentloop keys list`)") from None
        except ValueError as e:
            raise CliError(str(e)) from None
        remaining = store.count_active_keys()
    finally:
        store.close()
    print(_describe(key))
    if fn_name == "revoke_key" and remaining == 0:
        print("No active key is left: a gateway on a loopback address (or started with --open) is open again; "
              "any other refuses every /v1 request.", file=sys.stderr)
    return 0


def cmd_revoke(args) -> int:
    return _change(args, "revoke_key")


def cmd_trust(args) -> int:
    return _change(args, "set_key_trusted", trusted=True)


def cmd_untrust(args) -> int:
    return _change(args, "set_key_trusted", trusted=False)


def cmd_limits(args) -> int:
    limits = _limits(args)
    if not limits:
        raise CliError("give at least one of --rpm, --max-streams, --max-body-bytes, --max-tokens")
    return _change(args, "set_key_limits", **limits)


def add_commands(sub) -> None:
    keys = sub.add_parser("keys", help="Create, list, revoke and (un)trust user API keys (works on the store).")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--home", help="The gateway's AGENTLOOP_HOME (default: $AGENTLOOP_HOME or ~/.cache/agentloop).")
        p.add_argument("--database-url", help="The gateway's store (default: AGENTLOOP_DATABASE_URL or the "
                                              "SQLite file in the home).")
        return p

    def limit_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rpm", type=int, help="Requests per minute (default: AGENTLOOP_LIMIT_RPM).")
        p.add_argument("--max-streams", type=int, help="Chat completions in flight at once "
                                                       "(default: AGENTLOOP_LIMIT_STREAMS).")
        p.add_argument("--max-body-bytes", type=int, help="Largest request body (default: AGENTLOOP_LIMIT_BODY_BYTES).")
        p.add_argument("--max-tokens", type=int, help="Ceiling on max_tokens (default: AGENTLOOP_LIMIT_MAX_TOKENS).")

    p = common(ksub.add_parser("create", help="Create a key and print it (once)."))
    p.add_argument("--name", required=True, help="Who or what the key is for.")
    limit_flags(p)
    p.add_argument("--untrusted", action="store_true",
                   help="Store this key's feedback but never train on it (also: `keys untrust ID`).")
    p.add_argument("--key", help="Import this key instead of generating one (at least 16 characters), e.g. the "
                                 "bearer clients already send: they keep their completions and feedback.")
    p.set_defaults(func=cmd_create)
    p = common(ksub.add_parser("list", help="List keys (never the keys themselves)."))
    p.add_argument("--active", action="store_true", help="Only keys that are not revoked.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    for name, fn, text in (("revoke", cmd_revoke, "Revoke a key for good."),
                           ("trust", cmd_trust, "Train on this key's feedback again."),
                           ("untrust", cmd_untrust, "Keep this key's feedback out of training and the gate.")):
        p = common(ksub.add_parser(name, help=text))
        p.add_argument("key_id", help="The key's id (key_…), from `agentloop keys list`.")
        p.set_defaults(func=fn)
    p = common(ksub.add_parser("limits", help="Change a key's limits."))
    p.add_argument("key_id")
    limit_flags(p)
    p.set_defaults(func=cmd_limits)
