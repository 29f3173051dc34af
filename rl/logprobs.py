"""Log-probabilities of answers under a loaded causal LM: the scoring DPO training and the gate share.

Owns: `pair_logps` (one forward over a prompt and the answers' shared leading tokens, the rest
as a batch on the repeated cache), tokenizing a prompt and its answers exactly as TRL cuts them
(`_answer_ids`), and the sums built on them: `answer_logprobs`, `completion_logprob`,
`preference_margins` (log p(chosen) - log p(rejected), the gate's implicit preference).

Invariant: every score equals scoring each prompt+answer as one full sequence rendered with the
serving template (tests/test_shared_prefix.py and tests/test_rl_training.py compare them).
torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib

from agentloop.rl.common import normalize_message

__all__ = ["pair_logps", "answer_logprobs", "completion_logprob", "preference_margins"]


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def pair_logps(model, prompt, answers: list, *, prompt_gradient: bool = True) -> tuple[list, list]:
    """Per-token log-probs (and top-1 hits) of each answer after `prompt`, the shared part run once.

    Shared part = the prompt plus the answers' common leading tokens (two tool calls usually agree
    up to the argument that differs). Its forward returns its cache (with autograd history when
    gradients are on, unless `prompt_gradient` is False) and logits only where an answer token is
    predicted; the answers' remaining tokens run as one right-padded batch on the repeated cache.
    Right padding needs no attention mask: a causal position never sees later ones. The result
    equals scoring each prompt+answer as a full sequence.
    """
    import torch

    k, lengths = len(answers), [len(a) for a in answers]
    width = max(lengths) if answers else 0
    if width == 0 or min(lengths) == 0 or (k == 1 and not prompt_gradient):
        common = 0  # (a lone answer's tokens must not run in the gradient-free prompt pass)
    else:  # leading tokens all answers share, leaving each at least one token of its own
        common = 0
        first = answers[0]
        while common < min(lengths) - 1 and all(int(a[common]) == int(first[common]) for a in answers[1:]):
            common += 1
    shared = torch.cat([prompt, answers[0][:common]]) if common else prompt
    with contextlib.nullcontext() if prompt_gradient else torch.no_grad():
        # Logits of the last prompt position and of each shared answer token: they predict
        # answer tokens 0..common, identical for every answer.
        out = model(input_ids=shared[None], use_cache=True, logits_to_keep=common + 1)
    cache, head = out.past_key_values, out.logits
    if width == 0:
        zero = head.new_zeros(0)
        return [zero for _ in answers], [zero.bool() for _ in answers]
    batch = torch.zeros(k, width, dtype=prompt.dtype, device=prompt.device)
    for j, a in enumerate(answers):
        batch[j, : len(a)] = a
    if width > common + 1:
        cache.batch_repeat_interleave(k)
        pos = torch.arange(len(shared), len(prompt) + width - 1, device=prompt.device)[None].expand(k, -1)
        # Tokens common..width-2 predict common+1..width-1; the last token predicts nothing we score.
        rest = model(input_ids=batch[:, common:-1], past_key_values=cache, position_ids=pos, use_cache=True).logits
        logits = torch.cat([head.expand(k, -1, -1), rest], dim=1)
    else:
        logits = head.expand(k, -1, -1)[:, :width]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch[..., None]).squeeze(-1)
    top1 = logits.argmax(-1) == batch
    return [logprobs[j, :n] for j, n in enumerate(lengths)], [top1[j, :n] for j, n in enumerate(lengths)]


def _answer_ids(tokenizer, template: str, prompt: list, answers: list[list], tools, kwargs) -> tuple[list, list]:
    """Token ids as TRL cuts them: the prompt (with generation prompt) up to where it and every
    prompt+answer rendering diverge, then each answer's remaining tokens."""
    from agentloop.templates.registry import render

    prompt = [normalize_message(m) for m in prompt]
    p = _tokens(tokenizer, render(template, prompt, tools=tools, add_generation_prompt=True, **kwargs))
    fulls = []
    for a in answers:
        a = [normalize_message(m) for m in ([a] if isinstance(a, dict) else a)]
        fulls.append(_tokens(tokenizer, render(template, prompt + a, tools=tools, **kwargs)))
    n = len(p)
    for f in fulls:
        k = 0
        while k < min(n, len(f)) and p[k] == f[k]:
            k += 1
        n = k
    return p[:n], [f[n:] for f in fulls]


def answer_logprobs(model, tokenizer, template: str, prompt: list, answers: list[list], tools: list | None = None,
                    chat_template_kwargs: dict | None = None) -> list[float]:
    """Sum of log-probs of each answer's tokens after the prompt, the prompt run once."""
    import torch

    p, outs = _answer_ids(tokenizer, template, prompt, answers, tools, chat_template_kwargs or {})
    device = next(model.parameters()).device
    with torch.no_grad():
        lps, _ = pair_logps(model, torch.tensor(p, device=device), [torch.tensor(a, device=device) for a in outs])
    return [float(lp.sum()) for lp in lps]


def completion_logprob(model, tokenizer, template: str, prompt: list, completion: list, tools: list | None = None,
                       chat_template_kwargs: dict | None = None) -> float:
    """Sum of log-probs of the completion's tokens after the prompt, tokenized as TRL does."""
    return answer_logprobs(model, tokenizer, template, prompt, [completion], tools, chat_template_kwargs)[0]


def preference_margins(model, tokenizer, template: str, rows: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) per DPO row under `model` (the policy's implicit preference)."""
    out = []
    for r in rows:
        c, rj = answer_logprobs(model, tokenizer, template, r["prompt"], [r["chosen"], r["rejected"]],
                                r.get("tools"), r.get("chat_template_kwargs"))
        out.append(c - rj)
    return out
