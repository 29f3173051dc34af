"""BFCL v3 tool calling: plain vLLM against agentloop, same model, same cases, same caps.

Owns: the "Constrained tool calls" benchmark -- one run that starts plain vLLM 0.32 (the
default SmolLM2 model, `templates/chatml_tools.jinja`, vLLM's own `hermes` tool parser,
the agentloop plugin kept out with `VLLM_PLUGINS=none`), sends it the first N cases of each
BFCL category for `tool_choice` "required" and "auto", stops it, then does the same through an
agentloop gateway (`tests.conftest.start_gateway`, the same model folder), and also times a
forced call with a new large schema against the same schema again (grammar cache). Writes
the table to `docs/benchmarks.md` under "## Constrained tool calls" (that section only).

Counted per side, mode and category: forced calls returned without a call (required) or
answers without a call (auto), calls whose arguments are not a JSON object valid against the
tool's parameters (`jsonschema`, Draft 2020-12; a call to a function not offered counts too),
call markup left in `content`, answers cut by `max_tokens`, errors, and BFCL AST accuracy
(`bench/bfcl_ast.py`).

Invariant: at most one vLLM server runs at a time, and every server this starts is stopped
(also on error or Ctrl-C); both sides get byte-identical requests apart from `model`.

    .venv/bin/python -m bench.bfcl --per-category 50            # 200 cases, both modes, both sides
    .venv/bin/python -m bench.bfcl --per-category 2 --categories simple --no-docs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bfcl_ast import CATEGORIES, check_calls, load_category, to_openai_tool  # noqa: E402
from bench.docs import write_generated  # noqa: E402

DATA = Path("/work/shared/bfcl")
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Constrained tool calls"
MARKUP = ("<tool_call>", "</tool_call>")


# ------------------------------------------------------------------ servers


def start_plain_vllm(model_dir: Path, home: Path) -> tuple[Any, str, str]:
    """Plain vLLM as the gateway would start it, but with vLLM's own hermes parser and no plugin."""
    from agentloop.rl.precision import choose
    from agentloop.serve.settings import Settings
    from agentloop.serve.engine.supervisor import EngineProcess, vllm_argv, vllm_env
    from agentloop.templates.registry import get_template
    from tests.conftest import free_port

    defaults = {k: f.default for k, f in Settings.model_fields.items()}
    port = free_port()
    argv = vllm_argv(model=str(model_dir), served_name="plain", port=port,
                     chat_template=str(get_template("chatml-tools").path), tool_parser="hermes",
                     reasoning_parser=None, max_model_len=defaults["max_model_len"],
                     max_lora_rank=defaults["max_lora_rank"], max_loras=defaults["max_loras"],
                     dtype=choose(defaults["engine_dtype"]).vllm_dtype,
                     kv_cache_bytes=int(defaults["kvcache_space_gib"] * 2**30))
    env = vllm_env()
    # An allow-list naming no plugin (vllm/plugins: only listed names load): our
    # parsers stay out. The empty string would do too; a name reads clearer in `ps`.
    env["VLLM_PLUGINS"] = "none"
    proc = EngineProcess(argv, env, home / "plain-vllm.log")
    proc.spawn()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"plain vLLM exited with {proc.proc.returncode}; see {proc.log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url, "plain"
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"plain vLLM not ready; see {proc.log_path}")
    except BaseException:
        proc.terminate()  # also on Ctrl-C / SIGTERM while waiting: never leave it running
        raise


def start_agentloop(home: Path, model_dir: Path) -> tuple[Any, str]:
    """`tests.conftest.start_gateway` on the default model's folder; if interrupted while it
    waits for readiness, the gateway it spawned (our child, by pid) is stopped too."""
    import psutil

    from tests.conftest import start_gateway

    before = {c.pid for c in psutil.Process().children()}
    try:
        proc, url, _ = start_gateway(home, model_dir)
        return proc, url
    except BaseException:
        for child in psutil.Process().children():
            if child.pid not in before and "agentloop.serve.cli" in " ".join(child.cmdline()):
                child.terminate()  # SIGTERM: the gateway stops its engine on the way out
                child.wait(60)
        raise


# ------------------------------------------------------------------ requests


def case_request(case: dict, mode: str, max_tokens: int) -> dict:
    return {"messages": case["question"][0], "tools": [to_openai_tool(f) for f in case["function"]],
            "tool_choice": mode, "max_tokens": max_tokens, "temperature": 0}


def grade(case: dict, body: dict, status: int, resp: Any) -> dict:
    """One answer -> the counters of this benchmark (and the answer itself, for --regrade)."""
    out = {"id": case["id"], "category": case["category"], "status": status, "calls": 0, "invalid": 0,
           "no_call": False, "markup": False, "length": False, "ast": False, "reason": "",
           "answer": (resp.get("choices") or [None])[0] if isinstance(resp, dict) else resp}
    if status != 200 or not isinstance(resp, dict) or not resp.get("choices"):
        out["reason"] = f"HTTP {status}: {str(resp)[:200]}"
        return out
    choice = resp["choices"][0]
    message = choice.get("message") or {}
    content = message.get("content") or ""
    out["markup"] = any(m in content for m in MARKUP)
    out["length"] = choice.get("finish_reason") == "length"
    params = {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
    parsed: list[tuple[str, Any]] = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        name, raw = fn.get("name", ""), fn.get("arguments", "")
        try:
            args = json.loads(raw)
        except (TypeError, ValueError):
            args = None
        out["calls"] += 1
        valid = isinstance(args, dict) and name in params
        if valid:
            valid = not any(True for _ in jsonschema.Draft202012Validator(params[name]).iter_errors(args))
        out["invalid"] += not valid
        parsed.append((name, args))
    out["no_call"] = out["calls"] == 0
    out["ast"], out["reason"] = check_calls(case, parsed)
    return out


async def run_side(url: str, model: str, cases: list[dict], modes: list[str], max_tokens: int,
                   concurrency: int) -> list[dict]:
    jobs = [(case, mode) for mode in modes for case in cases]
    results: list[dict] = [{}] * len(jobs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while not queue.empty():
            i = queue.get_nowait()
            case, mode = jobs[i]
            body = case_request(case, mode, max_tokens)
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/chat/completions", json={"model": model, **body})
                status, resp = r.status_code, r.json()
            except (httpx.HTTPError, ValueError) as e:
                status, resp = 0, f"{type(e).__name__}: {e}"
            res = grade(case, body, status, resp)
            res.update(mode=mode, seconds=time.perf_counter() - t0)
            results[i] = res
            done += 1
            if done % 25 == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)}", flush=True)

    async with httpx.AsyncClient(timeout=900) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


async def cache_probe(url: str, model: str, repeats: int = 3) -> dict[str, float]:
    """Latency of 1-token forced calls, isolating the grammar from the prompt.

    A new large schema is first sent with tool_choice "auto" (new prompt, new grammar),
    then with "required": the prompt is now in vLLM's prefix cache but the grammar text
    (a forced tag) is new, so that request pays the compile and nothing else new; the
    same request again is all cached. A small schema gives the floor.
    """
    nonce = uuid.uuid4().hex[:8]  # a new schema text each run, so no earlier run warmed any cache
    big = {"type": "object", "required": ["order"], "properties": {"order": {"type": "object", "properties": {
        f"field_{nonce}_{i}": {"type": "array", "items": {"type": "object", "properties": {
            "kind": {"type": "string", "enum": [f"k{i}_{j}" for j in range(8)]},
            "amount": {"type": "number", "minimum": 0}, "note": {"type": "string"},
            "when": {"type": "string", "format": "date"}}, "required": ["kind", "amount"]}}
        for i in range(10)}}}}  # large, yet its prompt (~1600 tokens) fits the 2048-token context
    small = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    messages = [{"role": "user", "content": "Place the order."}]

    async def once(client: httpx.AsyncClient, schema: dict, choice: str) -> float:
        body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0,
                "tools": [{"type": "function", "function": {"name": "place_order", "parameters": schema}}],
                "tool_choice": choice}
        t0 = time.perf_counter()
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"cache probe: HTTP {r.status_code}: {r.text[:300]}")
        return time.perf_counter() - t0

    async with httpx.AsyncClient(timeout=900) as client:
        await once(client, small, "required")  # warm-up
        small_t = min([await once(client, small, "required") for _ in range(repeats)])
        new_prompt = await once(client, big, "auto")
        new_grammar = await once(client, big, "required")
        repeat = min([await once(client, big, "required") for _ in range(repeats)])
    return {"small": small_t, "new_prompt": new_prompt, "new_grammar": new_grammar, "repeat": repeat,
            "schema_chars": len(json.dumps(big))}


# ------------------------------------------------------------------ report


def summarize(results: list[dict]) -> dict[tuple[str, str], dict[str, int]]:
    rows: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results:
        for key in ((r["mode"], r["category"]), (r["mode"], "all")):
            row = rows[key]
            row["cases"] += 1
            row["no_call"] += r["no_call"]
            row["calls"] += r["calls"]
            row["invalid"] += r["invalid"]
            row["markup"] += r["markup"]
            row["length"] += r["length"]
            row["errors"] += r["status"] != 200
            row["ast"] += r["ast"]
    return rows


def table(sides: dict[str, list[dict]], categories: list[str], modes: list[str]) -> str:
    lines = ["| tool_choice | category | side | cases | no call | calls | schema-invalid calls | "
             "markup in content | cut by max_tokens | errors | AST accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summaries = {side: summarize(res) for side, res in sides.items()}
    for mode in modes:
        for cat in [*categories, "all"]:
            for side, rows in summaries.items():
                r = rows.get((mode, cat))
                if not r:
                    continue
                name = f"**{cat}**" if cat == "all" else cat
                lines.append(f"| {mode} | {name} | {side} | {r['cases']} | {r['no_call']} | {r['calls']} | "
                             f"{r['invalid']} | {r['markup']} | {r['length']} | {r['errors']} | "
                             f"{r['ast']}/{r['cases']} ({100 * r['ast'] / r['cases']:.1f}%) |")
    return "\n".join(lines)


def write_section(generated: str, path: Path = DOCS) -> None:
    """Our generated block in our section of the shared benchmarks file (bench/docs.py)."""
    write_generated(path, SECTION, "bench.bfcl", generated)


def section(args: argparse.Namespace, body: str, cache: dict[str, dict[str, float]], minutes: float) -> str:
    cmd = "`.venv/bin/python -m bench.bfcl " + " ".join(sys.argv[1:]) + "`"
    cache_lines = [
        "| side | small schema | large: new prompt and grammar (auto) | large: cached prompt, new grammar "
        "(required, first) | large: all cached (required again) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {side} | {c['small'] * 1000:.0f} ms | {c['new_prompt'] * 1000:.0f} ms | "
          f"{c['new_grammar'] * 1000:.0f} ms | {c['repeat'] * 1000:.0f} ms |" for side, c in cache.items()],
    ]
    schema_chars = next(iter(cache.values()))["schema_chars"] if cache else 0
    return f"""Command: {cmd} (measured {dt.date.today().isoformat()}, {minutes:.0f} min on the 2-core machine,
shared with other processes).

One run, one vLLM server at a time: **plain vLLM** 0.32 (default SmolLM2-135M-Instruct,
`templates/chatml_tools.jinja`, vLLM's `hermes` tool parser, our plugin kept out with
`VLLM_PLUGINS`), then **agentloop** (gateway on the same model folder: `agentloop_hermes` with
the xgrammar structural tag pinning each call's name and arguments schema). Same requests:
the first {args.per_category} cases of each BFCL v3 category ({", ".join(args.categories)}),
function docs converted to OpenAI tools (`dict`→`object`, `float`→`number`, `tuple`→`array`,
`any`→untyped, dotted names→`_`), `max_tokens` {args.max_tokens}, temperature 0, non-streamed.
"no call": for `required` a forced call returned without any call, for `auto` an answer
without a call (every case here expects one). "schema-invalid": a call whose arguments do not
validate (`jsonschema`) against the offered tool's parameters, or that names no offered tool.
AST accuracy: `bench/bfcl_ast.py` against BFCL's `possible_answer`.

{body}

Grammar cache (1-token forced call, best of 3 except first use; the large schema
is {schema_chars} characters, 10 array-of-object properties with enums, new text each run):

{chr(10).join(cache_lines)}

The engine's xgrammar `GrammarCompiler` caches compiled grammars by their text
(`cache_enabled=True`, `VLLM_XGRAMMAR_CACHE_MB`), and the gateway's tag is deterministic
for the same tools, so only the first request with a new tool set pays the compile; the
plugin's own schema check (an xgrammar grammar build without the tokenizer) is cached per
schema text (`functools.lru_cache`, 512 entries). vLLM's frontend still rebuilds the
tokenizer-free grammar once per request to validate it (uncached, cheap next to the compile).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=50, help="first N cases of each category (default 50)")
    p.add_argument("--categories", default=",".join(CATEGORIES),
                   type=lambda s: [c.strip() for c in s.split(",") if c.strip()])
    p.add_argument("--modes", default="required,auto", type=lambda s: [m.strip() for m in s.split(",") if m.strip()])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sides", default="vllm,agentloop", type=lambda s: s.split(","))
    p.add_argument("--out", type=Path, help="also write every graded answer here (JSON)")
    p.add_argument("--regrade", type=Path, help="grade the answers saved by --out again (no servers)")
    p.add_argument("--no-docs", action="store_true", help=f"do not write {DOCS.relative_to(ROOT)}")
    args = p.parse_args()
    bad = set(args.categories) - set(CATEGORIES)
    if bad:
        p.error(f"unknown categories {sorted(bad)} (known: {', '.join(CATEGORIES)})")

    from agentloop.serve.engine.default_model import ensure_default_model
    from tests.conftest import stop_gateway

    cases = [c for cat in args.categories for c in load_category(args.data, cat)[: args.per_category]]
    if args.regrade:
        saved = json.loads(args.regrade.read_text(encoding="utf-8"))
        by_id = {c["id"]: c for c in cases}
        sides = {side: [{**grade(by_id[r["id"]], case_request(by_id[r["id"]], r["mode"], args.max_tokens),
                                 r["status"], {"choices": [r["answer"]]} if r["status"] == 200 else r["answer"]),
                         "mode": r["mode"], "seconds": r["seconds"]} for r in rows if r["id"] in by_id]
                 for side, rows in saved.get("sides", saved).items()}
        print(table(sides, args.categories, args.modes))
        return
    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="agentloop-bfcl-"))
    print(f"{len(cases)} cases x {len(args.modes)} modes; model {model_dir}; logs in {home}", flush=True)
    t0 = time.monotonic()
    sides: dict[str, list[dict]] = {}
    cache: dict[str, dict[str, float]] = {}
    if "vllm" in args.sides:
        print("plain vLLM: starting", flush=True)
        proc, url, model = start_plain_vllm(model_dir, home)
        try:
            sides["plain vLLM"] = _run(run_side(url, model, cases, args.modes, args.max_tokens, args.concurrency))
            cache["plain vLLM"] = _run(cache_probe(url, model))
        finally:
            proc.terminate()
    save = (lambda: args.out.write_text(json.dumps({"sides": sides, "cache": cache}, indent=1), encoding="utf-8")) \
        if args.out else (lambda: None)
    save()  # after each side too: a run stopped halfway keeps what it measured
    if "agentloop" in args.sides:
        print("agentloop: starting", flush=True)
        gw_home = home / "gateway"
        gw_home.mkdir()
        proc, url = start_agentloop(gw_home, model_dir)
        try:
            sides["agentloop"] = _run(run_side(url, "agentloop", cases, args.modes, args.max_tokens,
                                               args.concurrency))
            cache["agentloop"] = _run(cache_probe(url, "agentloop"))
        finally:
            stop_gateway(proc)
    minutes = (time.monotonic() - t0) / 60
    body = table(sides, args.categories, args.modes)
    print(body)
    for side, c in cache.items():
        print(f"grammar cache ({side}): small {c['small']*1000:.0f} ms; large ({c['schema_chars']} chars): new prompt "
              f"{c['new_prompt']*1000:.0f} ms, new grammar {c['new_grammar']*1000:.0f} ms, "
              f"cached {c['repeat']*1000:.0f} ms")
    save()
    if not args.no_docs:
        write_section(section(args, body, cache, minutes))
        print(f"wrote {DOCS}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every `finally` stops its server


def _run(coro: Any) -> Any:
    """asyncio.run, where SIGTERM cancels the work at once (a plain Python handler may
    only run once the event loop wakes up) and then unwinds as KeyboardInterrupt."""
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, _interrupt)  # the loop's handler is gone with the loop


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)
    main()
