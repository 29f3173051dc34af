"""The `agentloop` command line. Domain errors become exit codes here, nowhere else.

Commands: serve; chat (a terminal chat with feedback, agents/cli_chat.py); the
admin commands train, promote, rollback, canary, adapters, runs, loop
(serve/cli/admin.py); and keys (user API keys, serve/cli/keys.py).

Invariant: `agentloop serve` with no arguments serves the embedded default
model on 127.0.0.1; every flag has an AGENTLOOP_* environment twin.
"""

from __future__ import annotations

import argparse
import logging
import sys

from agentloop.serve.cli.admin import CliError
from agentloop.serve.errors import AgentloopError


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from agentloop.serve.settings import Settings

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "model": args.model, "alias": args.alias,
        "template": args.template, "engine_port": args.engine_port, "database_url": args.database_url,
        "registry_url": args.registry_url, "graders_file": args.graders_file,
        "max_model_len": args.max_model_len,
        "engine_dtype": args.engine_dtype,
    }.items() if v is not None}
    if args.engine_url:
        overrides["engine_urls"] = args.engine_url
    if args.engine_arg:
        overrides["engine_extra_args"] = args.engine_arg
    if args.open:
        overrides["open"] = True
    try:
        settings = Settings(**overrides)
    except ValidationError as e:  # a bad flag or AGENTLOOP_* value: one line each, no traceback
        for err in e.errors():
            print(f"agentloop: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    settings.home.mkdir(parents=True, exist_ok=True)
    if (why := _access_refusal(settings)) is not None:
        print(f"agentloop: {why}", file=sys.stderr)
        return 2
    import uvicorn

    from agentloop.serve.http.app import create_app

    app = create_app(settings)
    # uvicorn turns SIGINT/SIGTERM into a lifespan shutdown, which stops the
    # supervised engine: no orphan survives a clean stop.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=30)
    return 0


def _access_refusal(settings) -> str | None:
    # Said here in one line, before anything starts; the gateway checks again at
    # start-up (serve/services/access.py) for apps built without this CLI.
    from agentloop.serve.services.access import refusal
    from agentloop.serve.store.db import Store

    with Store(settings.db_url) as store:
        return refusal(settings.host, settings.open, store.count_active_keys())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentloop", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="Serve the OpenAI-compatible API (starts a local vLLM unless --engine-url).")
    s.add_argument("--host", help="Bind address (default 127.0.0.1).")
    s.add_argument("--port", type=int, help="Gateway port (default 8000).")
    s.add_argument("--model", help="HF model folder or hub id (default: the embedded SmolLM2-135M-Instruct).")
    s.add_argument("--alias", help="Model name clients use (default 'agentloop').")
    s.add_argument("--template", help="Chat template from templates/ (default 'chatml-tools').")
    s.add_argument("--engine-url", action="append", help="Attach to a running vLLM server (repeatable).")
    s.add_argument("--engine-port", type=int, help="Port of the supervised vLLM server (default 8100).")
    s.add_argument("--engine-arg", action="append", help="Extra argument for the supervised vLLM (repeatable).")
    s.add_argument("--max-model-len", type=int,
                   help="Context length of the supervised engine (default: the model's own).")
    s.add_argument("--engine-dtype", help="dtype of the supervised engine: auto (default: bf16 where the CPU "
                                          "has native bf16, else fp32), bfloat16 or float32.")
    s.add_argument("--database-url", help="SQLAlchemy URL of the store (default SQLite in AGENTLOOP_HOME).")
    s.add_argument("--graders-file", help="A JSON file with the deployment's graders (rl/graders; default: "
                   "AGENTLOOP_GRADERS, else tool_schema, reference_call and reference_text).")
    s.add_argument("--registry-url", help="Where the deployment's adapter versions live, shared by its gateways: "
                                          "any fsspec URL (file:///dir, s3://bucket/prefix with s3fs, ...); "
                                          "default none: this gateway's own (AGENTLOOP_HOME/adapters).")
    s.add_argument("--open", action="store_true", default=None,
                   help="Serve /v1 without API keys on a non-loopback address while no key exists "
                        "(AGENTLOOP_OPEN; local use only: anyone who can connect can use the model).")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)

    from agentloop.serve.cli.admin import add_commands

    add_commands(sub)
    from agentloop.serve.cli.keys import add_commands as add_key_commands

    add_key_commands(sub)
    from agentloop.agents.cli_chat import add_chat_command

    add_chat_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Commands without --log-level log warnings only: an admin command's error must be the one
    # line on stderr (httpx would add an INFO line per request).
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "warning").upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AgentloopError as e:
        print(f"agentloop: {e.message}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"agentloop: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
