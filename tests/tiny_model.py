"""The tiny deterministic test model: built here, from random init, on scripted conversations.

Owns: turning tests/data/tiny_conversations.py into a few-MB Llama checkpoint
(on the SmolLM2 tokenizer of serve/engine/default_model.py) that reproduces every
scripted assistant turn exactly under greedy decoding, plus the
`tiny_manifest.json` beside the weights that tells tests what to expect.

Training text is rendered with the project's chat template exactly as serving
renders it (templates/registry.py, "chatml-tools"): prompt = the conversation
with the generation prompt, completion = the full render minus that prefix.
The loss covers completion tokens only (ending in `<|im_end|>`, the EOS).

Invariant: `<home>/models/tiny-<hash>/` exists only if complete and verified.
The hash covers this file, the data, the template (file and rendered text) and
the tokenizer source, so any change builds a new folder; the build writes into
a temp dir beside it, checks greedy generation of every variant from the saved
bf16 weights, and only then renames it into place (under a lock).

`python -m tests.tiny_model` builds it (if needed) and prints the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentloop.serve.engine.default_model import (
    WHEEL_SHA256, agentloop_home, ensure_default_model, file_lock, save_tokenizer,
)
from tests.data import tiny_conversations as data

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "chatml-tools"
TEMPLATE_FILE = ROOT / "templates" / "chatml_tools.jinja"
MANIFEST = "tiny_manifest.json"
EOS = "<|im_end|>"

# Small enough to train in minutes on 2 CPU cores; head_dim 32 is the smallest
# head size vLLM's CPU attention supports. Tied embeddings keep it to ~13 MB.
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
SEED = 20240611
LR = 5e-3
WARMUP = 20
MAX_STEPS = 400  # converges in ~70; fail in minutes, not an hour, if it ever does not
CHUNK_TOKENS = 6000  # tokens per forward pass; gradients accumulate over a step
VARIANTS_PER_STEP = 3
# Stop once every completion token is the argmax by at least this logit margin
# (teacher forced, fp32): wide enough that bf16 weights and vLLM's kernels
# still pick the same token.
STOP_MARGIN = 3.0
# Minimum margin re-measured on the saved bf16 weights; below it the build fails.
VERIFY_MARGIN = 1.0


def log(msg: str) -> None:
    print(f"[tiny_model] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Example:
    script: str
    prompt: str
    completion: str
    tools: list | None
    system: str | None


def _render(messages: list[dict], tools: list | None, *, generation: bool, thinking: bool) -> str:
    from agentloop.templates.registry import render

    return render(TEMPLATE, messages, tools=tools, add_generation_prompt=generation, enable_thinking=thinking)


def build_examples() -> tuple[list[Example], dict[str, Example]]:
    """All training examples, and per script its canonical one (no system
    message, the canonical tool list), which the manifest describes."""
    examples, canonical = [], {}
    for script in data.SCRIPTS:
        completions = set()
        for tools in data.tool_variants(script):
            for system in data.SYSTEM_VARIANTS:
                messages = data.with_system(script.history, system)
                prompt = _render(messages, tools, generation=True, thinking=script.enable_thinking)
                full = _render(messages + [script.reply], tools, generation=False, thinking=script.enable_thinking)
                if not full.startswith(prompt):
                    raise AssertionError(f"{script.id}: prompt is not a prefix of the full render:\n"
                                         f"{prompt!r}\n{full!r}")
                completion = full[len(prompt):]
                if not completion.endswith(EOS + "\n"):
                    raise AssertionError(f"{script.id}: completion does not end with {EOS!r}\\n: {completion!r}")
                completions.add(completion)
                ex = Example(script.id, prompt, completion, tools, system)
                examples.append(ex)
                if system is None and tools == data.canonical_tools(script):
                    canonical[script.id] = ex
        # The data's invariant: the answer never depends on the variant.
        if len(completions) != 1:
            raise AssertionError(f"{script.id}: completion differs across variants: {completions}")
        if script.id not in canonical:
            raise AssertionError(f"{script.id}: its canonical tool list is not among its variants")
    return examples, canonical


def build_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for path in (Path(__file__), Path(data.__file__), TEMPLATE_FILE):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    # Rendered text too: it also captures templates/registry.py's behaviour.
    h.update(json.dumps([[e.prompt, e.completion] for e in examples]).encode())
    h.update(WHEEL_SHA256.encode())
    return h.hexdigest()[:16]


def _expected(script: data.Script) -> dict[str, Any]:
    """The reply as an OpenAI-compatible server should parse it (arguments decoded)."""
    reply = script.reply
    return {
        "content": reply.get("content") or None,
        "reasoning_content": reply.get("reasoning_content"),
        "tool_calls": [
            {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in reply.get("tool_calls") or []
        ],
    }


def manifest(canonical: dict[str, Example], examples: list[Example], stats: dict) -> dict:
    """tiny_manifest.json: per script its id, kind ("scripted" or "style"), the
    canonical request (`messages` in OpenAI wire shape, `tools` or null,
    `enable_thinking`), the rendered `prompt`, the raw generated `text` (no EOS;
    with thinking it starts inside the <think> block the prompt opened), the parsed
    `expected` reply, and how many variants were trained; plus the build stats."""
    scripts = []
    for script in data.SCRIPTS:
        ex = canonical[script.id]
        scripts.append({
            "id": script.id,
            "kind": script.kind,
            "messages": script.history,
            "tools": ex.tools,
            "enable_thinking": script.enable_thinking,
            "prompt": ex.prompt,
            # What a server returns as raw text: the completion without the EOS stop token.
            "text": ex.completion[: -len(EOS + "\n")],
            "expected": _expected(script),
            "variants": sum(e.script == script.id for e in examples),
        })
    return {
        "template": TEMPLATE,
        "tools": data.ALL_TOOLS,
        "system_variants": list(data.SYSTEM_VARIANTS),
        "scripts": scripts,
        "build": stats,
    }


def _tokenize(tok, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """Prompt and completion tokenized apart, as at serving time (the engine
    tokenizes the prompt alone, then samples the completion's tokens)."""
    out = []
    for e in examples:
        p = tok(e.prompt, add_special_tokens=False).input_ids
        c = tok(e.completion, add_special_tokens=False).input_ids
        if tok.decode(c) != e.completion:
            raise AssertionError(f"completion does not round-trip through the tokenizer: {e.completion!r}")
        out.append((p, c))
    return out


def _chunks(seqs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Index groups of similar length, so padding wastes little compute."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    groups, cur, longest = [], [], 0
    for i in order:
        n = len(seqs[i][0]) + len(seqs[i][1])
        if cur and max(longest, n) * (len(cur) + 1) > CHUNK_TOKENS:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return groups + [cur] if cur else groups


def _batch(seqs, idx, pad_id):
    """input ids, attention mask, and the positions (b, t) whose next token is a completion token."""
    import torch

    width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, i in enumerate(idx):
        p, c = seqs[i]
        full = p + c
        ids[b, : len(full)] = torch.tensor(full)
        mask[b, : len(full)] = 1
        # Position t predicts token t+1: the last prompt token predicts c[0].
        for k, tok_id in enumerate(c):
            rows.append(b)
            cols.append(len(p) - 1 + k)
            targets.append(tok_id)
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def _completion_logits(model, batch):
    """Logits at completion positions only: the 49k-way head is most of the
    compute, and prompt positions carry no loss."""
    ids, mask, rows, cols, _ = batch
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[rows, cols])


def _margins(logits, targets):
    """Target logit minus the best other logit, per position (>0 means greedy picks the target)."""
    target = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return target - others.max(dim=1).values


def _pass(model, seqs, idx, *, grad: bool):
    """One pass over examples `idx` in length-sorted chunks; returns (loss, margins).

    With grad, the loss of every chunk is normalised by the total target count,
    so the accumulated gradient is that of one batch of all of them.
    """
    import torch

    sub = [seqs[i] for i in idx]
    batches = [_batch(sub, chunk, MODEL_CONFIG["pad_token_id"]) for chunk in _chunks(sub)]
    total = sum(len(seqs[i][1]) for i in idx)
    loss_sum, margins = 0.0, []
    with torch.set_grad_enabled(grad):
        for ids, mask, rows, cols, targets in batches:
            logits = _completion_logits(model, (ids, mask, rows, cols, targets))
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / total
            if grad:
                loss.backward()
            loss_sum += loss.item()
            margins.append(_margins(logits.detach(), targets))
    return loss_sum, torch.cat(margins)


def train(tok, examples: list[Example]):
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    config = LlamaConfig(vocab_size=len(tok), **MODEL_CONFIG)
    model = LlamaForCausalLM(config).float()
    model.train()
    seqs = _tokenize(tok, examples)
    by_script: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_script.setdefault(e.script, []).append(i)
    everything = list(range(len(examples)))
    log(f"{len(examples)} examples of {len(by_script)} scripts, "
        f"{sum(len(c) for _, c in seqs)} completion tokens; {VARIANTS_PER_STEP} variants per script per step")

    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    start = time.monotonic()
    full_checks = 0
    for step in range(1, MAX_STEPS + 1):
        # Every script each step, but only a few of its variants: the variants
        # share one completion, so all of them per step mostly repeats the
        # expensive 49k-way head for no new signal.
        idx = sorted(i for ids in by_script.values() for i in rng.sample(ids, min(VARIANTS_PER_STEP, len(ids))))
        opt.zero_grad(set_to_none=True)
        loss, margins = _pass(model, seqs, idx, grad=True)
        worst = margins.min().item()
        if step % 25 == 0 or step == 1:
            log(f"step {step}: loss {loss:.4f}, wrong tokens {int((margins <= 0).sum())}/{len(margins)}, "
                f"min margin {worst:.2f}, {time.monotonic() - start:.0f}s")
        if worst >= STOP_MARGIN:
            # Margins were measured before this step's update; confirm on every
            # variant with the same weights before stopping.
            full_checks += 1
            full_loss, full = _pass(model, seqs, everything, grad=False)
            log(f"step {step}: full check: loss {full_loss:.4f}, wrong tokens {int((full <= 0).sum())}, "
                f"min margin {full.min().item():.2f}, {time.monotonic() - start:.0f}s")
            if full.min().item() >= STOP_MARGIN:
                return model, {"steps": step - 1, "train_seconds": round(time.monotonic() - start, 1),
                               "final_loss": round(full_loss, 5), "train_min_margin": round(full.min().item(), 3),
                               "full_checks": full_checks}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    raise RuntimeError(f"tiny model did not converge in {MAX_STEPS} steps (min margin {worst:.2f})")


def verify(model_dir: Path, examples: list[Example]) -> dict:
    """Reload the saved bf16 weights and greedily generate every example's completion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    seqs = _tokenize(tok, examples)
    ok, failures, worst = 0, [], float("inf")
    with torch.no_grad():
        for e, (p, c) in zip(examples, seqs):
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=len(c) + 8, do_sample=False,
                                 eos_token_id=MODEL_CONFIG["eos_token_id"], pad_token_id=MODEL_CONFIG["pad_token_id"])
            text = tok.decode(out[0, len(p):])
            batch = _batch([(p, c)], [0], MODEL_CONFIG["pad_token_id"])
            worst = min(worst, _margins(_completion_logits(model, batch).float(), batch[4]).min().item())
            # generate stops after the EOS; the trained completion also has the "\n" after it.
            if text == e.completion[: -1]:
                ok += 1
            else:
                failures.append((e.script, e.system, [t["function"]["name"] for t in e.tools or []], text))
    return {"reproduced": ok, "total": len(examples), "failures": failures, "bf16_min_margin": round(worst, 3)}


def _save_tokenizer(tok, out_dir: Path) -> None:
    tok.model_max_length = MODEL_CONFIG["max_position_embeddings"]
    # The model only knows the project's template: make it the tokenizer's own too,
    # so anything rendering with the tokenizer's default gets what it was trained on.
    tok.chat_template = TEMPLATE_FILE.read_text()
    save_tokenizer(tok, out_dir)


def build(out_dir: Path, home: Path, examples: list[Example], canonical: dict[str, Example]) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(ensure_default_model(home))
    model, stats = train(tok, examples)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config.eos_token_id = MODEL_CONFIG["eos_token_id"]
    model.generation_config.pad_token_id = MODEL_CONFIG["pad_token_id"]
    model.save_pretrained(out_dir)
    _save_tokenizer(tok, out_dir)

    result = verify(out_dir, examples)
    scripts_ok = len(canonical) - len({f[0] for f in result["failures"]})
    log(f"greedy reproduction: {result['reproduced']}/{result['total']} examples, "
        f"{scripts_ok}/{len(canonical)} scripts, bf16 min margin {result['bf16_min_margin']}")
    if result["failures"] or result["bf16_min_margin"] < VERIFY_MARGIN:
        for script, system, tools, text in result["failures"][:10]:
            log(f"  FAILED {script} (system={system!r}, tools={tools}): {text!r}")
        raise RuntimeError(f"tiny model reproduces {result['reproduced']}/{result['total']} examples "
                           f"(bf16 min margin {result['bf16_min_margin']}); refusing to publish it")
    params = sum(p.numel() for p in model.parameters())
    weights = out_dir / "model.safetensors"
    stats.update({
        "params": params,
        "weights_bytes": weights.stat().st_size,
        "reproduced": result["reproduced"],
        "total": result["total"],
        "scripts_reproduced": scripts_ok,
        "bf16_min_margin": result["bf16_min_margin"],
        "build_seconds": round(time.monotonic() - t0, 1),
        "torch": torch.__version__,
    })
    return stats


def ensure_tiny_model(home: Path | str | None = None) -> Path:
    """The built tiny model folder for the current sources; builds it (minutes) if missing."""
    home = Path(home).expanduser() if home is not None else agentloop_home()
    examples, canonical = build_examples()
    name = f"tiny-{build_hash(examples)}"
    models = home / "models"
    target = models / name
    if (target / MANIFEST).is_file():  # the manifest is written last, just before the rename
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with file_lock(models / f".{name}.lock"):
        if (target / MANIFEST).is_file():
            return target
        for stale in models.glob(f".{name}.tmp-*"):  # crashed builds; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(dir=models, prefix=f".{name}.tmp-"))
        try:
            log(f"building {target}")
            stats = build(tmp, home, examples, canonical)
            (tmp / MANIFEST).write_text(json.dumps(manifest(canonical, examples, stats), indent=2) + "\n")
            os.chmod(tmp, 0o755)
            for child in tmp.iterdir():
                os.chmod(child, 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"built {target}: {json.dumps(stats)}")
    return target


if __name__ == "__main__":
    print(ensure_tiny_model(sys.argv[1] if len(sys.argv) > 1 else None))
