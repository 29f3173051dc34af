"""agentloop agents: tool-using agents, the retry-wrapped chatbot and ``agentloop chat``.

Owns nothing itself; exposes the public API of agents/agent.py (LangChain
agents with trajectory feedback), agents/chatbot.py (the chatbot) and
agents/gateway.py (gateway URLs, the ChatOpenAI factory, the feedback client).
Never imports fastapi: this is client code, run against any agentloop gateway.

Names load on first use (PEP 562): ``agentloop chat`` and the ``agentloop``
parser import agents.cli_chat, and must not pay for LangChain's import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "agent": ("Agent", "AgentContext", "AgentRun", "ForceToolChoice", "build_agent"),
    "chatbot": ("AnswerCleaner", "Chatbot", "ChatbotError", "ChatbotUnavailable", "Example", "Reply",
                "clean_answer", "is_retryable"),
    "gateway": ("FeedbackClient", "FeedbackError", "api_base", "chat_model", "thinking_body",
                "trajectory_feedback"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
