"""Pure-python splitting of `<think>` reasoning from content, in the agentloop chat formats.

Owns: the thinking switch as the templates compute it (`thinking_enabled`) and the
reasoning/content split of generated text, whole (`split_reasoning`) or as a stream of
deltas (`ThinkStreamSplitter`). No vllm/torch imports: the gateway, the trainer and the
vLLM plugin all use the same state machine (through `parsing.py`, which re-exports it).

Invariant: the splitter is a deterministic machine over characters, so the way a text is
cut into deltas changes only *when* output comes out, never *what*: feeding any chunking
of a text and then `finish()` yields exactly what `split_reasoning` yields for it. A
possibly partial `</think>` at the end of the buffer is held back until resolved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ThinkStreamSplitter", "partial_suffix", "request_template_kwargs", "split_reasoning", "thinking_enabled"]


def thinking_enabled(chat_template_kwargs: Mapping[str, Any] | None) -> bool:
    """The thinking switch exactly as the templates compute it.

    An explicit `enable_thinking` wins; otherwise `reasoning_effort` turns it
    on unless it is "none" (vLLM maps efforts the same way); default off.
    """
    kwargs = chat_template_kwargs or {}
    enabled = kwargs.get("enable_thinking")
    if enabled is not None:
        return bool(enabled)
    effort = kwargs.get("reasoning_effort")
    if effort is not None:
        return effort != "none"
    return False


def request_template_kwargs(request: Mapping[str, Any]) -> dict[str, Any]:
    """The chat-template kwargs a chat request is rendered with, served or trained on.

    OpenAI's `reasoning_effort` maps onto the template's thinking switch: any
    effort but "none" turns it on; an explicit `chat_template_kwargs.enable_thinking`
    wins. The gateway sends these to the engine and the dataset builder renders
    logged requests with them, so training never drifts from serving.
    """
    kwargs = dict(request.get("chat_template_kwargs") or {})
    if "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = request.get("reasoning_effort") not in (None, "none")
    return kwargs


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkStreamSplitter:
    """Splits `<think>` reasoning from content, fed text deltas.

    thinking=True: the prompt already opened `<think>\\n`, so everything up to
    the first `</think>` is reasoning (a repeated opener at the very start is
    dropped). thinking=False: text is content, unless the output starts with
    `<think>`, in which case that block is reasoning all the same. The
    template's joints are removed: one leading and one trailing newline of the
    reasoning and up to two newlines after `</think>`. Tool-call markup inside
    reasoning stays reasoning; after `</think>` nothing is parsed any more.
    """

    OPEN = "<think>"
    CLOSE = "</think>"
    _START, _START_OPEN, _REASONING, _SEPARATOR, _CONTENT = range(5)

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self._state = self._START_OPEN if thinking else self._START
        self._buf = ""
        self._at_start = True  # reasoning emitted nothing yet: one "\n" may go
        self._newlines = 0  # newlines stripped after </think>
        self.saw_reasoning = thinking

    @property
    def in_reasoning(self) -> bool:
        return self._state in (self._START_OPEN, self._REASONING)

    @property
    def content_started(self) -> bool:
        """Reasoning is over and its separator resolved: the rest is content."""
        return self._state == self._CONTENT

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) text released by this delta."""
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            state, buf = self._state, self._buf
            if state in (self._START, self._START_OPEN):
                if buf.startswith(self.OPEN):
                    self._buf = buf[len(self.OPEN):]
                    self._state, self.saw_reasoning = self._REASONING, True
                elif self.OPEN.startswith(buf) and not final:
                    break  # "" or a prefix of <think>: undecided
                else:
                    self._state = self._REASONING if state == self._START_OPEN else self._CONTENT
            elif state == self._REASONING:
                if self._at_start:
                    if not buf and not final:
                        break
                    if buf.startswith("\n"):
                        buf = buf[1:]
                    self._at_start = False
                end = buf.find(self.CLOSE)
                if end >= 0:
                    text = buf[:end]
                    reasoning.append(text[:-1] if text.endswith("\n") else text)
                    self._buf, self._state = buf[end + len(self.CLOSE):], self._SEPARATOR
                    continue
                if final:
                    reasoning.append(buf)
                    self._buf = ""
                    break
                safe = len(buf) - partial_suffix(buf, self.CLOSE)
                if safe and buf[safe - 1] == "\n":
                    safe -= 1  # may be the newline the template puts before </think>
                reasoning.append(buf[:safe])
                self._buf = buf[safe:]
                break
            elif state == self._SEPARATOR:
                while self._newlines < 2 and buf.startswith("\n"):
                    buf = buf[1:]
                    self._newlines += 1
                self._buf = buf
                if not buf and self._newlines < 2:
                    break
                self._state = self._CONTENT
            else:
                content.append(buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """One-shot split of a complete output: (reasoning or None, content)."""
    splitter = ThinkStreamSplitter(thinking)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return (r1 + r2 if splitter.saw_reasoning else None), c1 + c2
