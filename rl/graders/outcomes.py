"""Tool outcomes: what a tool said about the call that produced it, as a grade of that call.

In an agent's conversation, the request after a tool call carries the call's results: `tool`
messages after the assistant message that made the calls. A result that reports an error
(`reports_error`: text that starts with "Error", "Exception" or "Traceback", any case, or a JSON
object with a non-empty top-level "error") grades the call 0, any other result 1; the
`tool_outcome` grade is recorded on the completion whose answer made the call
(serve/services/grading.py finds it: the request's messages before that assistant message, with
the same tools, are the earlier request's, so its conversation hash names it, and the call's id
confirms it). So every client that sends tool results back -- the `openai` SDK, LangChain, the
Agent and Chatbot in agents/ -- reports its tools' outcomes with no code of its own.

Only the results at the end of a request are new (earlier ones were in earlier requests);
`new_tool_outcomes` returns those. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agentloop.rl.graders.base import Grade

TYPE = "tool_outcome"
VERSION = "1"
_ERROR_TEXT = re.compile(r"^\s*(error|exception|traceback)\b", re.IGNORECASE)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def reports_error(content: Any) -> bool:
    text = _text(content)
    if _ERROR_TEXT.match(text):
        return True
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return False
        return isinstance(data, dict) and bool(data.get("error"))
    return False


@dataclass(frozen=True)
class ToolOutcome:
    prefix: list[dict[str, Any]]  # the messages before the assistant message that made the call
    tool_call_id: str
    name: str
    ok: bool
    content: str

    def grade(self) -> Grade:
        said = " ".join(self.content.split())[:300]
        return Grade(TYPE, TYPE, VERSION, 1.0 if self.ok else 0.0,
                     f"{self.name or 'tool'} {'answered' if self.ok else 'reported an error'}: {said}")


def new_tool_outcomes(messages: Any) -> list[ToolOutcome]:
    """The outcomes the tool messages at the end of `messages` report (none unless they follow
    an assistant message whose calls they answer)."""
    if not isinstance(messages, list):
        return []
    i = len(messages)
    while i > 0 and isinstance(messages[i - 1], dict) and messages[i - 1].get("role") == "tool":
        i -= 1
    if i == len(messages) or i == 0 or not isinstance(messages[i - 1], dict) \
            or messages[i - 1].get("role") != "assistant":
        return []
    calls = {tc.get("id"): tc for tc in messages[i - 1].get("tool_calls") or [] if isinstance(tc, dict)}
    out = []
    for m in messages[i:]:
        tc = calls.get(m.get("tool_call_id"))
        if not isinstance(tc, dict) or not tc.get("id"):
            continue  # a result of no call of that message: nothing to grade
        fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
        content = m.get("content")
        out.append(ToolOutcome(messages[:i - 1], tc["id"], str(fn.get("name") or m.get("name") or ""),
                               not reports_error(content), _text(content)))
    return out
