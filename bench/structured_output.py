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
Counted per side and call: objects parsed, failures (cut at `max_tokens`, unparseable), median
seconds. Writes docs/benchmarks.md "## Structured output" (its generated block only).

    .venv/bin/python -m bench.structured_output                # 10 prompts, both sides (~5 min)
    .venv/bin/python -m bench.structured_output --prompts 3 --no-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import write_run  # noqa: E402
from bench.gateways import gateway  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Structured output"
PROMPTS = [f"Give the name and population of {c}." for c in (
    "Paris", "Tokyo", "a small village", "the largest city in Brazil", "London", "Cairo", "a city you like",
    "New York", "Sydney", "Berlin")]
SIDES = {"free whitespace": ["--engine-arg=--structured-outputs-config", '--engine-arg={"backend":"auto"}'],
         "compact": []}


def ask(url: str, prompts: list[str], max_tokens: int) -> dict[str, list[tuple[bool, float, str]]]:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    llm = ChatOpenAI(model="agentloop", base_url=f"{url}/v1", api_key="bench", temperature=0,
                     max_tokens=max_tokens, max_retries=0, timeout=600)
    structured = llm.with_structured_output(City, method="json_schema")
    out: dict[str, list[tuple[bool, float, str]]] = {"invoke": [], "stream": []}
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


def table(results: dict[str, dict[str, list[tuple[bool, float, str]]]]) -> str:
    lines = ["| side | call | prompts | parsed | failed | median seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for side, by_call in results.items():
        for how, rows in by_call.items():
            parsed = sum(ok for ok, _, _ in rows)
            lines.append(f"| {side} | {how} | {len(rows)} | {parsed} | {len(rows) - parsed} | "
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
    results = {}
    for side, extra in SIDES.items():
        with gateway(model_dir, extra=extra) as url:
            print(f"{side}: gateway up", flush=True)
            results[side] = ask(url, PROMPTS[: args.prompts], args.max_tokens)
    body = table(results)
    print(body)
    for side, by_call in results.items():
        for how, rows in by_call.items():
            for ok, _, why in rows:
                if not ok:
                    print(f"  {side} {how}: {why}")
    if not args.no_docs:
        write_run(DOCS, SECTION, "bench.structured_output", (
            f"Default model (base version), LangChain `with_structured_output(City, method=\"json_schema\")` "
            f"for `{{name: str, population: int}}`, `max_tokens` {args.max_tokens}, temperature 0; \"free "
            f"whitespace\" is the engine with vLLM's default structured-output config, \"compact\" ours "
            f"(`disable_any_whitespace`)."), body, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
