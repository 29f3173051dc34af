"""agentloop.serve: the gateway -- an OpenAI-compatible HTTP API in front of vLLM engines.

Sub-packages, each importing only the ones listed before it (tests/test_layout.py
checks this), on top of `settings` and `errors`:

- `protocol`    -- the OpenAI chat wire format: request checks, vLLM-to-OpenAI fixes,
                   stream assembly. Pure functions, no I/O, no web framework.
- `store`       -- everything persisted (completions, feedback, runs, keys) and all SQL,
                   beside its migrations.
- `engine`      -- the engine side: vLLM clients and their pool, process supervision and
                   start-up, which model name resolves to which adapter (the router), and
                   which adapters are resident in the engines (swaps, canary, rollback).
- `services`    -- what the gateway does, callable without HTTP: the chat-completion path,
                   feedback, the learning-loop runner.
- `compose`     -- the composition root: builds every part once and hands each its
                   collaborators.
- `http`        -- the HTTP edge: FastAPI routes, access middleware, OpenAPI docs, the UI;
                   domain errors become HTTP responses here.
- `cli`         -- the `agentloop` command; domain errors become exit codes here.
- `inside_vllm` -- code that runs only inside vLLM's processes (parsers, CPU LoRA ops);
                   nothing else imports it.

Nothing imported at package import time may pull in torch or vllm: the gateway
must start and answer /health without them.
"""
