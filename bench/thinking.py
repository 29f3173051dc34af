"""Thinking that answers: short questions with thinking on, the default model, side by side in one run.

Owns the "Thinking that answers" benchmark. One run starts a gateway on the embedded default
model (SmolLM2-135M-Instruct) for each side in turn, one engine at a time, and asks the same
questions with thinking on (`max_tokens` 512, `thinking_budget` 256, greedy, non-streamed):
- **budget only**: `AGENTLOOP_THINKING_CLOSE=false`, the engine as vLLM has it: a thinking
  budget, nothing that closes thinking the model ends its turn in;
- **budget + close** (the default): `CloseThinking` (serve/inside_vllm/think_end.py) too.
Counted per side: answers with non-empty content, where the turn ended (stop / length),
median reasoning and answer length, completion tokens and seconds per question. Writes the
table to docs/benchmarks.md under "## Thinking that answers" (its generated block only).

    .venv/bin/python -m bench.thinking                 # 20 questions, both sides (~6 min on 2 cores)
    .venv/bin/python -m bench.thinking --questions 4 --no-docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import write_run  # noqa: E402
from bench.gateways import gateway  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Thinking that answers"
QUESTIONS = [
    "What is 6 times 7?", "What is the capital of France?", "Name a primary color.", "What is 10 minus 3?",
    "Is ice cold or hot?", "How many legs does a spider have?", "What is the opposite of up?",
    "Which planet do we live on?", "What is 15 divided by 3?", "What color is the sky on a clear day?",
    "How many days are in a week?", "What do bees make?", "Is a whale a fish or a mammal?",
    "What is 9 plus 8?", "What language is spoken in Spain?", "How many hours are in a day?",
    "What is the freezing point of water in Celsius?", "Which is bigger, an elephant or a mouse?",
    "What is the square root of 81?", "Who wrote Romeo and Juliet?",
]
SIDES = {"budget only": {"AGENTLOOP_THINKING_CLOSE": "false"}, "budget + close": {}}


def ask_all(url: str, questions: list[str], max_tokens: int, budget: int) -> list[dict]:
    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    rows = []
    for q in questions:
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model="agentloop", messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": budget})
        m = r.choices[0].message
        rows.append({"question": q, "content": m.content or "", "reasoning": m.model_extra.get("reasoning") or "",
                     "finish": r.choices[0].finish_reason, "tokens": r.usage.completion_tokens,
                     "seconds": time.perf_counter() - t0})
    return rows


def run_side(name: str, env: dict[str, str], model_dir: Path, args: argparse.Namespace) -> list[dict]:
    with gateway(model_dir, env=env) as url:
        print(f"{name}: gateway up, asking {len(args.questions_list)} questions", flush=True)
        return ask_all(url, args.questions_list, args.max_tokens, args.budget)


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| side | questions | with content | finish stop / length | median reasoning chars | "
             "median answer chars | median completion tokens | seconds per question |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in results.items():
        n = len(rows)
        answered = sum(1 for r in rows if r["content"].strip())
        stop = sum(1 for r in rows if r["finish"] == "stop")
        length = sum(1 for r in rows if r["finish"] == "length")
        med = lambda key: statistics.median(len(r[key]) for r in rows)  # noqa: E731
        lines.append(f"| {name} | {n} | {answered}/{n} | {stop} / {length} | {med('reasoning'):.0f} | "
                     f"{med('content'):.0f} | {statistics.median(r['tokens'] for r in rows):.0f} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many of the questions to ask")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--budget", type=int, default=256, help="thinking_budget of each request")
    p.add_argument("--no-docs", action="store_true", help=f"do not write {DOCS.relative_to(ROOT)}")
    args = p.parse_args()
    args.questions_list = QUESTIONS[: args.questions]
    from agentloop.serve.engine.default_model import ensure_default_model

    model_dir = ensure_default_model()
    t0 = time.monotonic()
    results = {name: run_side(name, env, model_dir, args) for name, env in SIDES.items()}
    body = table(results)
    print(body)
    for name, rows in results.items():
        for r in rows[:3]:
            print(f"  {name}: {r['question']!r} -> reasoning {r['reasoning'][:60]!r} content {r['content'][:60]!r}")
    if not args.no_docs:
        write_run(DOCS, SECTION, "bench.thinking", (
            f"Default model, thinking on, {len(args.questions_list)} short questions, `max_tokens` "
            f"{args.max_tokens}, `thinking_budget` {args.budget}, temperature 0, non-streamed; one gateway "
            f"and engine per side, one at a time. \"budget only\": `AGENTLOOP_THINKING_CLOSE=false` (vLLM's "
            f"budget, nothing else); \"budget + close\": the default, with `CloseThinking`."), body, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
