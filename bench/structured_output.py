"""JSON that ends: LangChain `with_structured_output(method="json_schema")` on the default model.

Owns the "Structured output" benchmark. One run starts a gateway on the embedded default model
for each side in turn (one engine at a time) and asks the same prompts for a two-field object
(`name: str`, `population: int`) through LangChain's `ChatOpenAI(...).with_structured_output(
City, method="json_schema")`, `max_tokens` 256, temperature 0, once with `invoke` and once with
`stream`:
- **free whitespace**: the engine's structured outputs as vLLM starts by default (`--engine-arg
  --structured-outputs-config={"backend":"auto"}` overrides ours): the grammar lets the model
  put any whitespace between JSON tokens;
- **compact** (the default): `disable_any_whitespace` (serve/engine/supervisor.py).
Each side asks the base version (`agentloop@v0000`) and a version trained by the loop: both
gateways share one home, the compact one (first) trains it with one loop iteration (`POST
/admin/train`, the loop's default settings) on simulated user feedback (the "Certainly! " style of
tests/test_learning_loop.py: a correction where an answer lacks it, else a thumbs up) and makes it
live (through the gate, or `/admin/promote` if the gate keeps it out: this bench wants a trained
version, not a good one); the second gateway finds it live in the shared registry.
Counted per side, version and call: objects parsed, failures (cut at `max_tokens`,
unparseable), median seconds. Writes docs/benchmarks.md "## Structured output" (its generated
block only).

    .venv/bin/python -m bench.structured_output                # 10 prompts, both sides (~12 min)
    .venv/bin/python -m bench.structured_output --prompts 3 --no-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bfcl_learning import train_once  # noqa: E402
from bench.docs import write_run  # noqa: E402
from bench.gateways import gateway  # noqa: E402
from tests.conftest import ADMIN_KEY  # noqa: E402
from tests.test_learning_loop import STYLE, TRAIN  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Structured output"
PROMPTS = [f"Give the name and population of {c}." for c in (
    "Paris", "Tokyo", "a small village", "the largest city in Brazil", "London", "Cairo", "a city you like",
    "New York", "Sydney", "Berlin")]
# Compact first: it trains the version that both sides then ask.
SIDES = {"compact": [], "free whitespace": ["--engine-arg=--structured-outputs-config",
                                            '--engine-arg={"backend":"auto"}']}
Rows = dict[str, list[tuple[bool, float, str]]]


def train_a_version(url: str) -> tuple[str, str]:
    """One loop iteration on simulated style feedback; the trained version made live. Returns
    (version, how it became live)."""
    user = {"Authorization": "Bearer bench-user"}
    for prompt in TRAIN:
        r = httpx.post(f"{url}/v1/chat/completions", headers=user, timeout=600, json={
            "model": "agentloop", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": 32})
        r.raise_for_status()
        done = r.json()
        text = done["choices"][0]["message"]["content"] or ""
        fb = ({"completion_id": done["id"], "type": "thumbs", "value": 1} if text.startswith("Certainly! ") else
              {"completion_id": done["id"], "type": "correction", "correction": {"role": "assistant", "content": STYLE}})
        httpx.post(f"{url}/v1/feedback", headers=user, json=fb, timeout=60).raise_for_status()
    run, _ = train_once(url, ADMIN_KEY, {}, timeout=3600)
    if not run.get("version"):
        raise SystemExit(f"the loop trained no version: {run}")
    if run["status"] == "promoted":
        return run["version"], "promoted by the gate"
    httpx.post(f"{url}/admin/promote", json={"version": run["version"]}, timeout=300,
               headers={"Authorization": f"Bearer {ADMIN_KEY}"}).raise_for_status()
    return run["version"], f"gate said {run['status']}; promoted by hand"


def ask(url: str, prompts: list[str], max_tokens: int, model: str) -> Rows:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    llm = ChatOpenAI(model=model, base_url=f"{url}/v1", api_key="bench", temperature=0,
                     max_tokens=max_tokens, max_retries=0, timeout=600)
    structured = llm.with_structured_output(City, method="json_schema")
    out: Rows = {"invoke": [], "stream": []}
    for prompt in prompts:
        for how in ("invoke", "stream"):
            t0 = time.perf_counter()
            try:
                got = structured.invoke(prompt) if how == "invoke" else list(structured.stream(prompt))[-1]
                ok, why = isinstance(got, City), ""
            except Exception as e:  # LangChain raises on a cut or unparseable answer: that is the count
                ok, why = False, f"{type(e).__name__}: {str(e)[:80]}"
            out[how].append((ok, time.perf_counter() - t0, why))
    return out


def table(results: dict[tuple[str, str], Rows]) -> str:
    lines = ["| side | version | call | prompts | parsed | failed | median seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (side, version), by_call in results.items():
        for how, rows in by_call.items():
            parsed = sum(ok for ok, _, _ in rows)
            lines.append(f"| {side} | {version} | {how} | {len(rows)} | {parsed} | {len(rows) - parsed} | "
                         f"{statistics.median(s for _, s, _ in rows):.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--no-docs", action="store_true", help=f"do not write {DOCS.relative_to(ROOT)}")
    args = p.parse_args()
    from agentloop.serve.engine.default_model import ensure_default_model

    model_dir = ensure_default_model()
    t0 = time.monotonic()
    results: dict[tuple[str, str], Rows] = {}
    home = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    trained = how_live = ""
    for side, extra in SIDES.items():
        with gateway(model_dir, extra=extra, home=home) as url:
            print(f"{side}: gateway up", flush=True)
            results[(side, "base")] = ask(url, PROMPTS[: args.prompts], args.max_tokens, "agentloop@v0000")
            if not trained:
                t_train = time.monotonic()
                trained, how_live = train_a_version(url)
                print(f"trained {trained} in {time.monotonic() - t_train:.0f} s ({how_live})", flush=True)
            results[(side, f"trained ({trained})")] = ask(url, PROMPTS[: args.prompts], args.max_tokens, "agentloop")
    body = table(results)
    print(body)
    for (side, version), by_call in results.items():
        for how, rows in by_call.items():
            for ok, _, why in rows:
                if not ok:
                    print(f"  {side} {version} {how}: {why}")
    if not args.no_docs:
        write_run(DOCS, SECTION, "bench.structured_output", (
            f"Default model, LangChain `with_structured_output(City, method=\"json_schema\")` for "
            f"`{{name: str, population: int}}`, `max_tokens` {args.max_tokens}, temperature 0; \"free "
            f"whitespace\" is the engine with vLLM's default structured-output config, \"compact\" ours "
            f"(`disable_any_whitespace`). \"base\" is v0000; \"trained\" a version from one loop iteration "
            f"(default settings) on {len(TRAIN)} pieces of simulated style feedback, {how_live}."), body, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
