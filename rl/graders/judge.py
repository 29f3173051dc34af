"""A judge: an OpenAI-compatible model scores the answer, `{"type": "judge", ...}`.

The prompt is a template in templates/ (`prompt`, default `judge_score`: templates/judge_score.jinja,
rendered in a sandbox with the conversation, the tools, the candidate and the reference) sent as
one user message to `model` at `base_url` (`/chat/completions`, temperature 0, `max_tokens`),
with a `response_format` JSON schema that asks for `{"score": 0..10, "reason"}`; the grade is
score / 10. Without `base_url` the judge is the deployment's own engine and live version (the
composition root passes where that is: `served`); the judge's requests go to the engine, not
through the gateway, so they never enter the request log as a user's completions.
`api_key_env` names an environment variable holding the key (never the key itself in settings).

`mode: "rank"` judges several answers to one request together (`Grader.ranks`; rl/graders/base.py
`grade_group`), as OpenPipe ART's RULER does: one prompt (`prompt`, default `judge_rank`:
templates/judge_rank.jinja) shows the numbered answers, the schema asks for exactly one 0..10
score per answer, and each answer's grade is its score / 10. Relative scores separate answers that
an absolute 0..10 would score alike; one answer alone is ranked by itself.

A judge that cannot be reached, answers an error, runs past `timeout` (seconds, default 60) or
answers anything but that JSON gives a failed grade with the reason (grade_all).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

from agentloop.rl.graders.base import Case, Grader, GraderConfigError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
          "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 10},
                         "reason": {"type": "string", "maxLength": 200}}}
MODES = {"score": "judge_score", "rank": "judge_rank"}  # mode -> its default prompt
MAX_RANKED = 16  # answers in one ranking prompt


def rank_schema(n: int) -> dict[str, Any]:
    """Exactly `n` integer scores 0..10, in the answers' order, and one reason."""
    return {"type": "object", "additionalProperties": False, "required": ["scores", "reason"],
            "properties": {"scores": {"type": "array", "minItems": n, "maxItems": n,
                                      "items": {"type": "integer", "minimum": 0, "maximum": 10}},
                           "reason": {"type": "string", "maxLength": 300}}}
Served = Callable[[], tuple[str, str]]  # () -> (base_url, model) of the deployment's live version


def render_prompt(name: str, **context: Any) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from agentloop.templates.registry import TEMPLATE_DIR

    path = TEMPLATE_DIR / f"{name}.jinja"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env.from_string(path.read_text()).render(**context).strip()


class JudgeGrader(Grader):
    type = "judge"
    fields = frozenset({"model", "base_url", "api_key_env", "prompt", "timeout", "max_tokens", "mode"})

    def __init__(self, name: str | None = None, *, model: str | None = None, base_url: str | None = None,
                 api_key_env: str | None = None, prompt: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 200, mode: str = "score", served: Served | None = None):
        super().__init__(name)
        from agentloop.templates.registry import TEMPLATE_DIR

        if mode not in MODES:
            raise GraderConfigError(f"judge 'mode' must be one of {', '.join(MODES)}; got {mode!r}")
        if prompt is None:
            prompt = MODES[mode]
        if base_url is not None and (not isinstance(base_url, str) or not base_url.startswith(("http://", "https://"))):
            raise GraderConfigError(f"judge 'base_url' must be an http(s) URL; got {base_url!r}")
        if base_url is not None and not model:
            raise GraderConfigError("judge 'model' is needed with a 'base_url'")
        if model is not None and not isinstance(model, str):
            raise GraderConfigError("judge 'model' must be a string")
        if api_key_env is not None and not (isinstance(api_key_env, str) and re.fullmatch(r"[A-Za-z_]\w*", api_key_env)):
            raise GraderConfigError("judge 'api_key_env' must name an environment variable")
        if not isinstance(prompt, str) or not re.fullmatch(r"[\w-]+", prompt) \
                or not (TEMPLATE_DIR / f"{prompt}.jinja").is_file():
            raise GraderConfigError(f"judge 'prompt' must name a template in templates/; got {prompt!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise GraderConfigError("judge 'timeout' must be seconds in (0, 600]")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 16 <= max_tokens <= 4096:
            raise GraderConfigError("judge 'max_tokens' must be an integer in [16, 4096]")
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.prompt, self.timeout, self.max_tokens = prompt, float(timeout), max_tokens
        self.mode, self.ranks = mode, mode == "rank"
        self.served = served

    def options(self) -> dict[str, Any]:
        return {"mode": self.mode, "model": self.model, "base_url": self.base_url, "api_key_env": self.api_key_env,
                "prompt": self.prompt, "timeout": self.timeout, "max_tokens": self.max_tokens}

    def applies(self, case: Case) -> bool:
        return bool(case.candidate.get("content") or case.candidate.get("tool_calls"))

    def _where(self) -> tuple[str, str]:
        if self.base_url is not None:
            return self.base_url.rstrip("/"), str(self.model)
        if self.served is None:
            raise RuntimeError("a judge without 'base_url' needs the deployment's engine, and there is none here")
        url, model = self.served()
        return url.rstrip("/"), self.model or model

    def score(self, case: Case) -> tuple[float, str]:
        if self.ranks:
            return self.score_group([case])[0]
        prompt = render_prompt(self.prompt, messages=case.request.get("messages") or [], tools=case.tools,
                               candidate=case.candidate, reference=case.reference)
        verdict, model = self._ask(prompt, SCHEMA)
        try:
            score, reason = verdict["score"], verdict["reason"]
        except (KeyError, TypeError):
            raise ValueError(f"the judge answered no JSON score: {json.dumps(verdict)[:200]!r}") from None
        return _scaled(score) / 10, f"judge {model}: {str(reason)[:300]}"

    def score_group(self, cases: list[Case]) -> list[tuple[float, str]]:
        if not self.ranks:
            return super().score_group(cases)
        if len(cases) > MAX_RANKED:  # one prompt per slice: a long list overflows the judge's context
            return [r for i in range(0, len(cases), MAX_RANKED) for r in self.score_group(cases[i:i + MAX_RANKED])]
        first = cases[0]
        prompt = render_prompt(self.prompt, messages=first.request.get("messages") or [], tools=first.tools,
                               candidates=[c.candidate for c in cases], reference=first.reference)
        verdict, model = self._ask(prompt, rank_schema(len(cases)))
        try:
            scores, reason = verdict["scores"], verdict["reason"]
        except (KeyError, TypeError):
            raise ValueError(f"the judge answered no JSON scores: {json.dumps(verdict)[:200]!r}") from None
        if not isinstance(scores, list) or len(scores) != len(cases):
            raise ValueError(f"the judge scored {len(scores) if isinstance(scores, list) else scores!r} "
                             f"of {len(cases)} answers")
        return [(_scaled(s) / 10, f"judge {model}, ranked {i + 1} of {len(cases)} ({s}/10): {str(reason)[:300]}")
                for i, s in enumerate(scores)]

    def _ask(self, prompt: str, schema: dict[str, Any]) -> tuple[Any, str]:
        """The judge's JSON answer to `prompt`, constrained by `schema`, and the model that gave it."""
        import httpx

        url, model = self._where()
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.max_tokens,
                "response_format": {"type": "json_schema", "json_schema": {"name": "grade", "schema": schema}}}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            r = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException:
            raise TimeoutError(f"the judge at {url} did not answer within {self.timeout:g}s") from None
        except httpx.HTTPError as e:
            raise ConnectionError(f"the judge at {url} cannot be reached: {e}") from None
        if r.status_code != 200:
            raise RuntimeError(f"the judge at {url} answered {r.status_code}: {r.text[:200]}")
        try:
            return json.loads(r.json()["choices"][0]["message"]["content"]), model
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"the judge answered no JSON score: {r.text[:200]!r}") from None


def _scaled(score: Any) -> float:
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 10:
        raise ValueError(f"the judge's score {score!r} is not in 0..10")
    return float(score)
