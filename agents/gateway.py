"""Client-side access to an agentloop gateway: URLs, the LangChain chat model, and feedback.

What it owns: how agents and chat clients address the gateway (``api_base``),
the ``ChatOpenAI`` they use (``chat_model``; thinking is a switch sent as
``chat_template_kwargs.enable_thinking``), and ``FeedbackClient``, the one
place that sends ``POST /v1/feedback``.

Invariant: feedback is sent at most once per distinct body. Every POST
carries an ``Idempotency-Key`` derived from the body, so a retried send (after
a timeout or a dropped connection) can never store a second row; the gateway
answers the retry with the first row.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

DEFAULT_MODEL = "agentloop"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_POLICY = "You are a helpful assistant."  # the chatbot's system prompt unless told otherwise


def api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` → ``http://host:port/v1``."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def thinking_body(on: bool) -> dict[str, Any]:
    """The request extra that switches the chat template's thinking mode on or off.

    Explicit both ways: the template's default could change, the switch must not.
    """
    return {"chat_template_kwargs": {"enable_thinking": bool(on)}}


def chat_model(url: str, api_key: str = "agentloop", model: str = DEFAULT_MODEL, *, thinking: bool = False,
               temperature: float = 0.0, max_tokens: int | None = 256, timeout: float = 120.0,
               max_retries: int = 2, **kwargs: Any):
    """A LangChain ``ChatOpenAI`` pointed at the gateway (nothing agentloop-specific but the switch)."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=api_base(url), api_key=api_key, temperature=temperature,
                      max_tokens=max_tokens, timeout=timeout, max_retries=max_retries,
                      extra_body=thinking_body(thinking), **kwargs)


class FeedbackError(RuntimeError):
    """The gateway refused a feedback (4xx) or stayed unreachable; ``str()`` says why."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class _Transient(Exception):
    """A response worth retrying (429 / 5xx)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, _Transient))


def _error_text(r: httpx.Response) -> tuple[str, str | None]:
    try:
        err = r.json().get("error") or {}
        return str(err.get("message") or r.text), err.get("code")
    except ValueError:
        return r.text or f"HTTP {r.status_code}", None


class FeedbackClient:
    """Sends feedback on completions to ``POST /v1/feedback`` (same bearer key as the completions)."""

    def __init__(self, url: str, api_key: str = "agentloop", *, timeout: float = 30.0, attempts: int = 4,
                 max_wait: float = 2.0) -> None:
        self.url = f"{api_base(url)}/feedback"
        self.api_key = api_key
        self.attempts, self.max_wait = attempts, max_wait
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FeedbackClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def idempotency_key(body: dict[str, Any]) -> str:
        canon = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "agentloop-client-" + hashlib.sha256(canon.encode()).hexdigest()[:40]

    def send(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST one feedback body; returns the stored feedback object. Raises FeedbackError."""
        headers = {"Idempotency-Key": self.idempotency_key(body)}

        def once() -> httpx.Response:
            r = self._http.post(self.url, json=body, headers=headers)
            if r.status_code == 429 or r.status_code >= 500:
                raise _Transient(r)
            return r

        try:
            r = Retrying(stop=stop_after_attempt(self.attempts), retry=retry_if_exception(_retryable),
                         wait=wait_exponential(multiplier=0.2, max=self.max_wait) + wait_random(0, 0.2),
                         reraise=True)(once)
        except _Transient as e:
            msg, code = _error_text(e.response)
            raise FeedbackError(f"the gateway kept failing ({e.response.status_code}): {msg}",
                                e.response.status_code, code) from None
        except httpx.TransportError as e:
            raise FeedbackError(f"the gateway is unreachable at {self.url}: {e}") from None
        if r.status_code != 200:
            msg, code = _error_text(r)
            raise FeedbackError(msg, r.status_code, code)
        return r.json()

    def thumbs(self, completion_id: str, value: int, comment: str | None = None) -> dict[str, Any]:
        if value not in (1, -1):
            raise ValueError("thumbs feedback is +1 or -1")
        return self.send(self._with_comment({"type": "thumbs", "completion_id": completion_id, "value": value},
                                            comment))

    def rating(self, completion_id: str, value: int, comment: str | None = None) -> dict[str, Any]:
        return self.send(self._with_comment({"type": "rating", "completion_id": completion_id, "value": value},
                                            comment))

    def correction(self, completion_id: str, correction: str | dict[str, Any],
                   comment: str | None = None) -> dict[str, Any]:
        """``correction`` is the answer the model should have given: text, or a full assistant message."""
        msg = {"role": "assistant", "content": correction} if isinstance(correction, str) else dict(correction)
        return self.send(self._with_comment({"type": "correction", "completion_id": completion_id,
                                             "correction": msg}, comment))

    def pairwise(self, chosen_id: str, rejected_id: str, comment: str | None = None) -> dict[str, Any]:
        return self.send(self._with_comment({"type": "pairwise", "chosen_id": chosen_id,
                                             "rejected_id": rejected_id}, comment))

    @staticmethod
    def _with_comment(body: dict[str, Any], comment: str | None) -> dict[str, Any]:
        return {**body, "comment": comment} if comment is not None else body


def trajectory_feedback(client: FeedbackClient, completion_ids: list[str], verdict: int | str | dict[str, Any],
                        comment: str | None = None) -> list[dict[str, Any]]:
    """Feedback on one multi-call run (an agent task, a chat turn with tools).

    ``+1``/``-1``: a thumbs on every completion of the run — each model call
    shares the credit or the blame for the outcome. A string or an assistant
    message: a correction of the last completion (the one that answered).
    """
    if not completion_ids:
        raise ValueError("the run has no completions to give feedback on")
    if isinstance(verdict, bool) or not isinstance(verdict, (int, str, dict)):
        raise TypeError("verdict must be +1, -1, a corrected answer (str) or an assistant message (dict)")
    if isinstance(verdict, int):
        return [client.thumbs(cid, verdict, comment) for cid in dict.fromkeys(completion_ids)]
    return [client.correction(completion_ids[-1], verdict, comment)]
