"""`agentloop train | promote | rollback | canary | adapters | runs | loop`: the admin API from a shell.

Each command is one call to the gateway's /admin endpoints (the same names),
with the admin key from --admin-key or AGENTLOOP_ADMIN_KEY. `agentloop loop`
is the separate scheduler worker: it watches the store the gateway writes
and asks the gateway to train when enough new feedback has arrived or the
period has passed (the gateway runs the job, gates and promotes).

Invariant: HTTP and connection errors become one clear line on stderr and
a non-zero exit code; nothing here imports torch or vllm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx


class CliError(Exception):
    pass


def _client(args) -> httpx.Client:
    key = args.admin_key or os.environ.get("AGENTLOOP_ADMIN_KEY")
    if not key:
        raise CliError("an admin key is needed: --admin-key or AGENTLOOP_ADMIN_KEY")
    return httpx.Client(base_url=args.url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _call(args, method: str, path: str, body: dict | None = None) -> dict:
    try:
        with _client(args) as c:
            r = c.request(method, path, json=body)
    except httpx.ConnectError:
        raise CliError(f"cannot reach the gateway at {args.url} (is `agentloop serve` running?)")
    try:
        data = r.json()
    except ValueError:
        data = {"error": {"message": r.text[:500]}}
    if r.status_code >= 400:
        err = data.get("error") or {}
        raise CliError(f"{r.status_code}: {err.get('message') or data}")
    return data


def _print(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_train(args) -> int:
    params = json.loads(args.params) if args.params else {}
    run = _call(args, "POST", "/admin/train", {"promote": not args.no_promote, "method": args.method,
                                                "params": params})
    if not args.wait:
        _print(run)
        return 0
    while True:
        r = _call(args, "GET", f"/admin/runs/{run['id']}")
        print(f"{run['id']}: {r['status']} (steps logged: {len(r.get('metrics') or [])})", file=sys.stderr)
        if r["status"] not in ("queued", "running"):
            r.pop("metrics", None)
            _print(r)
            return 0 if r["status"] in ("promoted", "passed") else 1
        time.sleep(5)


def cmd_promote(args) -> int:
    _print(_call(args, "POST", "/admin/promote", {"version": args.version}))
    return 0


def cmd_rollback(args) -> int:
    _print(_call(args, "POST", "/admin/rollback", {"version": args.version}))
    return 0


def cmd_canary(args) -> int:
    body = {"share": 0} if args.off else {"version": args.version, "share": args.share}
    _print(_call(args, "POST", "/admin/canary", body))
    return 0


def cmd_adapters(args) -> int:
    data = _call(args, "GET", "/admin/adapters")["data"]
    for a in data:
        served = "served" if a.get("served") else ""
        print(f"{a['version']}  {a['status']:<9}  parent={a.get('parent') or '-':<6} {served:<6}  {a.get('reason', '')}")
    return 0


def cmd_runs(args) -> int:
    if args.run_id:
        _print(_call(args, "GET", f"/admin/runs/{args.run_id}"))
        return 0
    for r in _call(args, "GET", "/admin/runs")["data"]:
        print(f"{r['id']}  {r['status']:<9} {r['method']}  version={r.get('version') or '-'}  {r.get('reason') or ''}")
    return 0


def cmd_loop(args) -> int:
    """The scheduler as its own worker, pointed at the gateway's store."""
    from agentloop.serve.services.loop import run_due
    from agentloop.serve.settings import Settings
    from agentloop.serve.store.db import Store

    settings = Settings(**({"database_url": args.database_url} if args.database_url else {}))
    cfg = settings.loop_defaults()
    store = Store(settings.db_url)
    print(f"agentloop loop: watching {settings.db_url}; training via {args.url} when {cfg.min_new_feedback} "
          f"new feedback or {cfg.period_seconds:.0f}s passed", file=sys.stderr)
    try:
        while True:
            due, new = run_due(store, cfg)
            if due:
                try:
                    run = _call(args, "POST", "/admin/train", {"promote": True})
                    print(f"started {run['id']} ({new} new feedback)", file=sys.stderr)
                except CliError as e:
                    print(f"not started: {e}", file=sys.stderr)
            if args.once:
                return 0
            time.sleep(args.interval)
    finally:
        store.close()


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--url", default=os.environ.get("AGENTLOOP_URL", "http://127.0.0.1:8000"),
                       help="Gateway URL (AGENTLOOP_URL).")
        p.add_argument("--admin-key", help="Admin key (default: AGENTLOOP_ADMIN_KEY).")
        return p

    p = common(sub.add_parser("train", help="Start one learning-loop iteration now."))
    p.add_argument("--no-promote", action="store_true", help="Gate the candidate but do not promote it.")
    p.add_argument("--method", choices=["dpo", "kto"])
    p.add_argument("--params", help="LoopConfig overrides as JSON, e.g. '{\"train\": {\"max_steps\": 20}}'.")
    p.add_argument("--wait", action="store_true", help="Wait for the run to finish and print it.")
    p.set_defaults(func=cmd_train)
    p = common(sub.add_parser("promote", help="Make a version live."))
    p.add_argument("version")
    p.set_defaults(func=cmd_promote)
    p = common(sub.add_parser("rollback", help="Make an earlier version live again."))
    p.add_argument("version")
    p.set_defaults(func=cmd_rollback)
    p = common(sub.add_parser("canary", help="Send a share of the alias's traffic to a version."))
    p.add_argument("version", nargs="?")
    p.add_argument("share", nargs="?", type=float, default=0.1)
    p.add_argument("--off", action="store_true", help="Stop the canary.")
    p.set_defaults(func=cmd_canary)
    p = common(sub.add_parser("adapters", help="List adapter versions."))
    p.set_defaults(func=cmd_adapters)
    p = common(sub.add_parser("runs", help="List training runs, or show one."))
    p.add_argument("run_id", nargs="?")
    p.set_defaults(func=cmd_runs)
    p = common(sub.add_parser("loop", help="Run the loop scheduler as its own worker."))
    p.add_argument("--database-url", help="The gateway's store (default: AGENTLOOP_DATABASE_URL or the SQLite file).")
    p.add_argument("--interval", type=float, default=60.0, help="Seconds between checks.")
    p.add_argument("--once", action="store_true", help="Check once and exit.")
    p.set_defaults(func=cmd_loop)
