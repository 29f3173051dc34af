"""On-policy samples: several answers of the live version to the loop's training prompts, for the
graders to score (rl/graded.py) and the dataset to pair (rl/datasets.py).

What it owns: which logged prompts are sampled (`sampling_prompts`: the conversations callers gave
reference feedback on, in the training split, from callers not excluded, with feedback the live
lineage was not trained on yet, newest first, at most `max_prompts`), the sampling request (the
prompt as logged: messages, tools, tool_choice, response format, thinking; with `n`, a temperature
and a token cap) and the result: per conversation group (rows.group_key), the sampled answers.

Invariants
- Held-out conversations (the dataset's split: the same hash, salt and percent) are never sampled:
  the gate's held-out pairs stay made of logged answers only.
- The request goes through the gateway's own chat path (`LoopHooks.sample`: validation, the engine
  body, constrained tool calls, answer fixing), never to the engine raw, so a sample is what a user
  would have been served; samples are not logged as users' completions.
- A prompt whose sampling fails is counted and left out; sampling never fails a run.
- Pure orchestration: no I/O of its own beyond the store read and the `sample` callable it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from agentloop.rl.rows import assistant_message, bucket, group_key, prompt_of

log = logging.getLogger("agentloop.sampling")

# What a logged request says about how to sample, which sampling sets itself.
_SAMPLING_KEYS = ("model", "stream", "stream_options", "n", "temperature", "top_p", "seed", "max_tokens",
                  "max_completion_tokens", "logprobs", "top_logprobs", "user")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class SamplingConfig:
    """On-policy sampling in a loop iteration. Every field has ``metadata["help"]``."""

    k: int = _help("Answers sampled from the live version per training prompt (the request's n); 0 turns "
                   "sampling off. Graded with the logged answers, they give the best-against-worst pairs.", default=4)
    temperature: float = _help("Sampling temperature: high enough that the k answers differ.", default=1.0)
    max_tokens: int = _help("Token cap of a sampled answer (the logged request's own cap, if lower, wins).",
                            default=256)
    max_prompts: int = _help("At most this many prompts sampled per run (newest feedback first).", default=64)
    concurrency: int = _help("Prompts sampled at once (the engine batches them).", default=4)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 <= self.k <= 16:
            raise ValueError("sampling.k must be an integer in 0..16")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 2:
            raise ValueError("sampling.temperature must be in [0, 2]")
        for name in ("max_tokens", "max_prompts", "concurrency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"sampling.{name} must be an integer >= 1")


@dataclass(frozen=True)
class Prompt:
    key: tuple                # rows.group_key: caller, conversation hash, rendering
    request: dict[str, Any]   # the logged request of the newest reference feedback's completion
    feedback_ids: tuple[str, ...]
    reference: dict[str, Any] | None = None  # the newest reference (an assistant message)


def sampling_prompts(store, cfg: SamplingConfig, *, eval_percent: int, split_salt: str = "",
                     exclude_callers: tuple[str, ...] = (), trained_feedback_ids: tuple[str, ...] = (),
                     held_out: bool = False, max_prompts: int | None = None) -> list[Prompt]:
    """The training prompts to sample (see the module docstring); with `held_out`, the held-out
    ones instead (the gate's graded prompts, rl/gate.py `graded_check`). Blocking (reads the store)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    excluded, trained = set(exclude_callers), set(trained_feedback_ids)
    for fb in store.iter_feedback_with_completions():
        c = fb.get("completion")
        if fb["type"] != "reference" or fb["caller"] in excluded or c is None or c["status_code"] != 200 \
                or not isinstance(c.get("request"), dict):
            continue
        p = prompt_of(c)
        if (bucket(p["conversation_hash"], split_salt) < eval_percent) != held_out:
            continue  # held out: the gate's, never sampled for training
        groups.setdefault(group_key(fb["caller"], p), []).append(fb)
    out = []
    for key, fbs in groups.items():
        ids = tuple(f["id"] for f in fbs)
        if set(ids) <= trained:
            continue  # the live lineage learned from these already
        last = fbs[-1]  # oldest first: the caller's newest word
        out.append(Prompt(key, last["completion"]["request"], ids, assistant_message(last.get("reference"))))
    newest = {p.key: max((f["created_at"], f["id"]) for f in groups[p.key]) for p in out}
    out.sort(key=lambda p: newest[p.key], reverse=True)
    return out[:cfg.max_prompts if max_prompts is None else max_prompts]


def sampling_body(request: dict[str, Any], cfg: SamplingConfig) -> dict[str, Any]:
    """The request to sample `cfg.k` answers to a logged `request` with."""
    body = {k: v for k, v in request.items() if k not in _SAMPLING_KEYS}
    cap = request.get("max_completion_tokens") or request.get("max_tokens")
    body.update(n=cfg.k, temperature=cfg.temperature,
                max_tokens=min(cfg.max_tokens, cap) if isinstance(cap, int) and cap > 0 else cfg.max_tokens)
    return body


Sample = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]  # body -> chat.completion of the live version


async def sample(prompts: list[Prompt], generate: Sample, cfg: SamplingConfig) -> tuple[dict[tuple, list], dict]:
    """({group key: the sampled assistant messages}, stats: prompts, answers, failed, seconds)."""
    t0, sem = time.monotonic(), asyncio.Semaphore(cfg.concurrency)
    out: dict[tuple, list[dict[str, Any]]] = {}
    failed = 0

    async def one(p: Prompt) -> None:
        nonlocal failed
        async with sem:
            try:
                resp = await generate(sampling_body(p.request, cfg))
            except Exception as e:  # noqa: BLE001 - a prompt not sampled is counted, the run goes on
                failed += 1
                log.warning("sampling %s failed: %s: %s", p.key[1][:12], type(e).__name__, e)
                return
        msgs = [ch.get("message") for ch in sorted(resp.get("choices") or [], key=lambda ch: ch.get("index", 0))
                if isinstance(ch, dict) and isinstance(ch.get("message"), dict)]
        out[p.key] = msgs

    await asyncio.gather(*(one(p) for p in prompts))
    stats = {"prompts": len(prompts), "answers": sum(len(v) for v in out.values()), "failed": failed,
             "seconds": round(time.monotonic() - t0, 3)}
    return out, stats
