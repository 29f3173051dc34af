"""The retry-wrapped chatbot: a client-side conversation against the gateway that survives failures.

What it owns: the prompt (a policy system message, few-shot examples, the
conversation so far, the new user message — the server applies the chat
template), one streamed call per model turn, the cleaning of the answer
(echoed prompt, role prefixes like "Assistant:", leaked template markers,
a hallucinated next "User:" turn, surrounding whitespace), the retries, the
optional tool loop, and feedback on the last turn.

Invariants
- The conversation lives here, client-side, and every call sends all of it:
  a gateway or engine restart between (or during) turns loses nothing.
- A turn enters the history only once it succeeded; a failed turn leaves the
  history as it was and keeps the user's message for ``retry()``.
- Retries (tenacity) cover connection errors, timeouts, 429, 5xx, empty
  answers and streams cut off before their finish reason, with bounded
  exponential back-off (``Retry-After`` honoured up to the bound) under both
  an attempt limit and a deadline. Other errors (a 400, a 401) are not retried. When retries run out the caller gets
  ``ChatbotUnavailable``, whose message is written for the user.
- What is streamed to ``on_delta`` is exactly the cleaned answer: the cleaner
  holds back only what it cannot decide yet (a possible prefix, trailing
  whitespace, a partial marker).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import httpx
import openai
from tenacity import (RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_attempt,
                      stop_after_delay, wait_exponential, wait_random)

from agentloop.agents.gateway import (
    DEFAULT_POLICY, FeedbackClient, api_base, thinking_body, trajectory_feedback,
)

if TYPE_CHECKING:  # the registry (and LangChain under it) loads only when tools are used
    from agentloop.tools.registry import ToolRegistry, ToolResult

__all__ = ["DEFAULT_POLICY", "AnswerCleaner", "Chatbot", "ChatbotError", "ChatbotUnavailable", "EmptyAnswer",
           "Example", "Reply", "TruncatedAnswer", "clean_answer", "is_retryable"]
ROLE_NAMES = ("assistant", "ai", "bot", "chatbot", "agentloop")
MARKERS = ("<|im_end|>", "<|endoftext|>")  # removed wherever they leak
# The model starting the next turn itself: everything from here on is dropped.
CUT_AT = ("\nUser:", "\nuser:", "\nHuman:", "<|im_start|>user", "<|im_start|>system")
EMPTY_RETRY_TEMPERATURE = 0.7  # greedy decoding would give the same empty answer again

OnDelta = Callable[[str, str], None]         # (kind: "content" | "reasoning", text)
OnEvent = Callable[[str, dict[str, Any]], None]  # ("retry" | "tool", details)


@dataclass(frozen=True)
class Example:
    """A few-shot exchange shown to the model before the conversation."""

    user: str
    assistant: str


@dataclass
class Reply:
    text: str
    completion_ids: list[str]          # every model call of the turn; the last one answered
    reasoning: str = ""
    tool_results: list[ToolResult] = field(default_factory=list)
    attempts: int = 0                  # calls made, retries included

    @property
    def completion_id(self) -> str:
        return self.completion_ids[-1]


class ChatbotError(RuntimeError):
    """A turn failed; ``str()`` is a message for the user."""


class ChatbotUnavailable(ChatbotError):
    """The server stayed unreachable or failing through every retry."""

    def __init__(self, message: str, attempts: int, last_error: BaseException | None) -> None:
        super().__init__(message)
        self.attempts, self.last_error = attempts, last_error


class EmptyAnswer(Exception):
    """The model answered nothing usable (retried)."""


class TruncatedAnswer(Exception):
    """The stream ended without a finish reason: the server went away mid-answer (retried)."""


# ---------------------------------------------------------------- answer cleaning

class AnswerCleaner:
    """Cleans a streamed answer incrementally; ``clean_answer`` is the one-shot form."""

    def __init__(self, prompt: str | None = None, roles: Sequence[str] = ROLE_NAMES) -> None:
        heads = [f"{r}{sep}" for r in roles for sep in (":", " :")]
        heads += ["<|im_start|>assistant\n", "<|im_start|>assistant"]
        p = (prompt or "").strip()
        if p:
            # An echo ends its line; "Hello! How can I help?" answering "Hello" is no echo.
            heads += [f"{p}\n", f"user: {p}\n", f"<|im_start|>user\n{p}<|im_end|>"]
        self._heads = [h.lower() for h in heads]
        self._head_done = False
        self._cut = False
        self._buf = ""

    def _strip_head(self, final: bool) -> str | None:
        """The buffer without its prefixes, or None while a prefix may still be forming."""
        s = self._buf
        for _ in range(4):  # e.g. an echoed prompt followed by "Assistant:"
            body = s.lstrip()
            low = body.lower()
            full = next((h for h in self._heads if low.startswith(h)), None)
            if full is not None:
                s = body[len(full):]
                continue
            if not final and (not body or any(h.startswith(low) for h in self._heads)):
                return None
            return body
        return s.lstrip()

    def _safe_split(self, text: str) -> tuple[str, str]:
        """(emit now, hold back): hold trailing whitespace and any partial marker or cut sequence."""
        stripped = text.rstrip()
        hold = len(text) - len(stripped)
        for m in (*MARKERS, *CUT_AT):
            for k in range(min(len(m) - 1, len(stripped)), 0, -1):
                if stripped.endswith(m[:k]):
                    hold = max(hold, len(text) - len(stripped) + k)
                    break
        if hold > len(text):
            hold = len(text)
        return text[:len(text) - hold], text[len(text) - hold:]

    def _scrub(self) -> None:
        for c in CUT_AT:
            i = self._buf.find(c)
            if i >= 0:
                self._buf, self._cut = self._buf[:i], True
        for m in MARKERS:
            self._buf = self._buf.replace(m, "")

    def feed(self, delta: str) -> str:
        """Take raw text; return what can be shown now."""
        if self._cut or not delta:
            return ""
        self._buf += delta
        self._scrub()
        if not self._head_done:
            body = self._strip_head(final=self._cut)
            if body is None:
                return ""
            self._buf, self._head_done = body, True
        if self._cut:
            out, self._buf = self._buf.rstrip(), ""
            return out
        out, self._buf = self._safe_split(self._buf)
        return out

    def finish(self) -> str:
        """The rest, once the stream ended."""
        self._scrub()
        if not self._head_done:
            self._buf = self._strip_head(final=True) or ""
            self._head_done = True
        out, self._buf = self._buf.rstrip(), ""
        return out


def clean_answer(text: str, prompt: str | None = None) -> str:
    c = AnswerCleaner(prompt)
    return (c.feed(text) + c.finish()).strip()


# ---------------------------------------------------------------- retry policy

def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (EmptyAnswer, TruncatedAnswer, openai.APIConnectionError, httpx.TransportError)):
        return True  # APIConnectionError covers timeouts; TransportError a stream cut mid-way
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    # An error event inside an SSE stream (the engine died mid-answer) has no status.
    return type(exc) is openai.APIError


def _retry_after(exc: BaseException | None) -> float | None:
    resp = getattr(exc, "response", None)
    value = resp.headers.get("retry-after") if resp is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off


class _Backoff:
    """Exponential back-off with jitter; a server's Retry-After wins, up to the same bound."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.maximum = maximum
        self._exp = wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)

    def __call__(self, state: RetryCallState) -> float:
        ra = _retry_after(state.outcome.exception() if state.outcome else None)
        return min(self.maximum, ra) if ra is not None else min(self.maximum, self._exp(state))


def _api_message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body)
    return str(err.get("message") or e.message) if isinstance(err, dict) else e.message


def describe_error(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"connection failed ({type(cause).__name__})" if cause else "connection failed"
    if isinstance(exc, EmptyAnswer):
        return "empty answer"
    if isinstance(exc, TruncatedAnswer):
        return "the answer was cut off"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- the chatbot

@dataclass
class _Call:
    id: str
    content: str
    reasoning: str
    tool_calls: list[dict[str, Any]]


class Chatbot:
    def __init__(self, url: str, api_key: str = "agentloop", model: str = "agentloop", *,
                 policy: str | None = DEFAULT_POLICY, examples: Sequence[Example] = (),
                 temperature: float = 0.0, max_tokens: int = 256, attempts: int = 8, deadline: float = 120.0,
                 initial_wait: float = 0.25, max_wait: float = 8.0, request_timeout: float = 60.0,
                 tools: ToolRegistry | None = None, use_tools: bool = False, thinking: bool = False,
                 max_tool_rounds: int = 3, client: openai.OpenAI | None = None) -> None:
        self.url, self.api_key, self.model = url, api_key, model
        self.policy, self.examples = policy, list(examples)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.attempts, self.deadline = attempts, deadline
        self.initial_wait, self.max_wait = initial_wait, max_wait
        self.tools, self.use_tools, self.thinking = tools, use_tools, thinking
        self.max_tool_rounds = max_tool_rounds
        # The SDK's own retries are off: tenacity below is the one retry policy.
        self.client = client or openai.OpenAI(base_url=api_base(url), api_key=api_key, max_retries=0,
                                              timeout=openai.Timeout(request_timeout, connect=5.0))
        self.history: list[dict[str, Any]] = []
        self.last: Reply | None = None
        self.pending: str | None = None   # a user message whose turn failed
        self._last_turn_at = 0            # where the last turn starts in the history
        self._feedback: FeedbackClient | None = None

    # ---------------------------------------------------------------- prompt

    def prompt(self, turn: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """The messages sent: policy, few-shot examples, history, then this turn so far."""
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.policy}] if self.policy else []
        for ex in self.examples:
            msgs += [{"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.assistant}]
        return msgs + self.history + list(turn)

    def reset(self) -> None:
        self.history, self.last, self.pending, self._last_turn_at = [], None, None, 0

    # ---------------------------------------------------------------- turns

    def ask(self, text: str, *, on_delta: OnDelta | None = None, on_event: OnEvent | None = None) -> Reply:
        """One user turn to its final answer (tool rounds included). Raises ChatbotError."""
        if not text.strip():
            raise ValueError("empty message")
        self.pending = text
        turn: list[dict[str, Any]] = [{"role": "user", "content": text}]
        ids: list[str] = []
        results: list[ToolResult] = []
        reasoning, attempts = "", 0
        for round_ in range(self.max_tool_rounds + 1):
            # The last round offers no tools, so a turn always ends in words.
            offer = bool(self.use_tools and self.tools and len(self.tools) and round_ < self.max_tool_rounds)
            call, n = self._call(self.prompt(turn), text, offer, on_delta, on_event)
            attempts += n
            ids.append(call.id)
            reasoning += call.reasoning
            if not call.tool_calls:
                turn.append({"role": "assistant", "content": call.content})
                break
            turn.append({"role": "assistant", "content": call.content or None, "tool_calls": call.tool_calls})
            done = self.tools.execute(call.tool_calls)
            for r in done:
                if on_event:
                    on_event("tool", {"name": r.name, "ok": r.ok, "content": r.content,
                                      "arguments": next(c["function"]["arguments"] for c in call.tool_calls
                                                        if c["id"] == r.tool_call_id)})
            results += done
            turn += [r.message() for r in done]
        self._last_turn_at = len(self.history)
        self.history += turn
        self.pending = None
        self.last = Reply(text=turn[-1]["content"] or "", completion_ids=ids, reasoning=reasoning,
                          tool_results=results, attempts=attempts)
        return self.last

    def retry(self, *, on_delta: OnDelta | None = None, on_event: OnEvent | None = None) -> Reply:
        """Send a failed message again, or regenerate the last answer."""
        if self.pending is not None:
            return self.ask(self.pending, on_delta=on_delta, on_event=on_event)
        if self.last is None:
            raise ChatbotError("Nothing to retry yet.")
        text = self.history[self._last_turn_at]["content"]
        del self.history[self._last_turn_at:]
        self.last = None
        return self.ask(text, on_delta=on_delta, on_event=on_event)

    def _call(self, messages: list[dict[str, Any]], user_text: str, offer_tools: bool,
              on_delta: OnDelta | None, on_event: OnEvent | None) -> tuple[_Call, int]:
        """One model call under the retry policy → (call, attempts made)."""
        state = {"attempts": 0, "empty": False}

        def attempt() -> _Call:
            state["attempts"] += 1
            temp = max(self.temperature, EMPTY_RETRY_TEMPERATURE) if state["empty"] else self.temperature
            try:
                return self._stream_once(messages, user_text, offer_tools, temp, on_delta)
            except EmptyAnswer:
                state["empty"] = True
                raise

        def before_sleep(rs: RetryCallState) -> None:
            if on_event:
                on_event("retry", {"attempt": rs.attempt_number, "wait": rs.upcoming_sleep,
                                   "error": describe_error(rs.outcome.exception())})

        retrying = Retrying(stop=stop_after_attempt(self.attempts) | stop_after_delay(self.deadline),
                            wait=_Backoff(self.initial_wait, self.max_wait), retry=retry_if_exception(is_retryable),
                            before_sleep=before_sleep)
        start = time.monotonic()
        try:
            return retrying(attempt), state["attempts"]
        except RetryError as e:
            last = e.last_attempt.exception()
            what = ("the model gave only empty answers" if isinstance(last, EmptyAnswer)
                    else f"the model server did not answer ({describe_error(last)})")
            raise ChatbotUnavailable(
                f"Sorry, {what} after {state['attempts']} attempts over {time.monotonic() - start:.1f} s. "
                "Your message is kept: /retry sends it again.", state["attempts"], last) from last
        except openai.APIStatusError as e:  # not retryable: the request itself is wrong
            raise ChatbotError(f"The server refused the request (HTTP {e.status_code}): {_api_message(e)}") from e

    def _stream_once(self, messages: list[dict[str, Any]], user_text: str, offer_tools: bool, temperature: float,
                     on_delta: OnDelta | None) -> _Call:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                  "temperature": temperature, "max_tokens": self.max_tokens,
                                  "extra_body": thinking_body(self.thinking)}
        if offer_tools:
            kwargs["tools"] = self.tools.openai_tools()
        cleaner = AnswerCleaner(user_text)
        cid, content, reasoning, finish = "", [], [], None
        calls: dict[int, dict[str, Any]] = {}

        def emit(kind: str, text: str) -> None:
            if text and on_delta:
                on_delta(kind, text)

        stream = self.client.chat.completions.create(**kwargs)
        with stream:
            for chunk in stream:
                cid = cid or chunk.id
                for ch in chunk.choices:
                    finish = ch.finish_reason or finish
                    d = ch.delta
                    r = (d.model_extra or {}).get("reasoning_content")
                    if r:
                        reasoning.append(r)
                        emit("reasoning", r)
                    if d.content:
                        out = cleaner.feed(d.content)
                        content.append(out)
                        emit("content", out)
                    for tc in d.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"id": "", "type": "function",
                                                           "function": {"name": "", "arguments": ""}})
                        if tc.id:
                            slot["id"] = tc.id
                        if tc.function and tc.function.name:
                            slot["function"]["name"] += tc.function.name
                        if tc.function and tc.function.arguments:
                            slot["function"]["arguments"] += tc.function.arguments
        if finish is None:
            raise TruncatedAnswer()
        tail = cleaner.finish()
        content.append(tail)
        emit("content", tail)
        text = "".join(content).strip()
        tool_calls = [calls[i] for i in sorted(calls)]
        for i, c in enumerate(tool_calls):
            c["id"] = c["id"] or f"call_{cid}_{i}"  # the history needs ids to pair results
        if not text and not tool_calls:
            raise EmptyAnswer()
        return _Call(cid, text, "".join(reasoning), tool_calls)

    # ---------------------------------------------------------------- feedback

    def _client(self) -> FeedbackClient:
        if self._feedback is None:
            self._feedback = FeedbackClient(self.url, self.api_key)
        return self._feedback

    def _last_ids(self) -> list[str]:
        if self.last is None:
            raise ChatbotError("There is no answer to give feedback on yet.")
        return self.last.completion_ids

    def good(self, comment: str | None = None) -> list[dict[str, Any]]:
        """Thumbs up on every completion of the last turn."""
        return trajectory_feedback(self._client(), self._last_ids(), 1, comment)

    def bad(self, comment: str | None = None) -> list[dict[str, Any]]:
        """Thumbs down on every completion of the last turn."""
        return trajectory_feedback(self._client(), self._last_ids(), -1, comment)

    def fix(self, correction: str, comment: str | None = None) -> list[dict[str, Any]]:
        """A correction of the last answer; the history then holds the corrected text."""
        if not correction.strip():
            raise ValueError("the correction is empty")
        rows = trajectory_feedback(self._client(), self._last_ids(), correction, comment)
        # Later turns should build on what the user says is right.
        if self.history and self.history[-1]["role"] == "assistant" and not self.history[-1].get("tool_calls"):
            self.history[-1] = {"role": "assistant", "content": correction}
            self.last.text = correction
        return rows

    def close(self) -> None:
        self.client.close()
        if self._feedback is not None:
            self._feedback.close()
