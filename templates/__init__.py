"""agentloop chat templates and the parsers that read their output back.

Owns: the public API of the `templates` package -- the template registry
(`registry.py`), the pure-python output parsers (`parsing.py`) and the schema
rewrites of the grammars that constrain the output (`json_schema.py`). The vLLM
plugin (`vllm_plugin.py`) is deliberately not imported here.

Invariant: importing this package never imports torch or vllm, so the gateway
and the trainer can use it; every template has a paired parser that reads
what the template renders back into the same content, reasoning and calls.
"""

from agentloop.templates.parsing import (
    TOOL_PARSERS, Event, HermesToolParser, JsonScanner, Llama3JsonToolParser, TextDelta,
    ThinkStreamSplitter, ToolCall, ToolCallArgs, ToolCallStart, ToolCallStreamParser, assemble,
    extract_hermes, extract_llama3_json, parse_call_object, split_reasoning, thinking_enabled,
)
from agentloop.templates.registry import (
    TEMPLATE_DIR, ChatTemplate, get_template, list_templates, render, template_text,
)

__all__ = [
    "ChatTemplate", "get_template", "list_templates", "template_text", "render", "TEMPLATE_DIR",
    "ToolCall", "TextDelta", "ToolCallStart", "ToolCallArgs", "Event", "JsonScanner",
    "parse_call_object", "assemble", "thinking_enabled", "ToolCallStreamParser",
    "HermesToolParser", "Llama3JsonToolParser", "ThinkStreamSplitter", "split_reasoning",
    "extract_hermes", "extract_llama3_json", "TOOL_PARSERS",
]
