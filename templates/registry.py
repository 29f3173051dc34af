"""Chat-template registry: which Jinja template a model speaks, and which parsers read it.

Owns: the name -> `ChatTemplate` table, the `.jinja` files of this package, and
`render`, which renders them in a Jinja environment configured the way
transformers' `apply_chat_template` configures its own (sandboxed,
`trim_blocks`, `lstrip_blocks`, loop controls, a `tojson` that keeps key order
and non-ASCII text and does not HTML-escape, `raise_exception`,
`strftime_now`, and a pass-through `{% generation %}` block).

Invariant: for the same messages, tools and kwargs, `render(name, ...)` is
byte-identical to `tokenizer.apply_chat_template(..., tokenize=False,
chat_template=template_text(name))` -- so what the trainer renders here is
exactly what vLLM renders at serving time (tests/test_templates.py checks it).
Pure python: imports jinja2 only, never torch or vllm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "get_template", "list_templates", "template_text", "render", "TEMPLATE_DIR"]

TEMPLATE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    path: Path
    tool_parser: str  # vLLM --tool-call-parser name (registered by templates.vllm_plugin)
    reasoning_parser: str | None  # vLLM --reasoning-parser name, None if no thinking mode
    supports_thinking: bool
    # The end-of-thinking marker as the template writes it after the reasoning; the engine
    # writes it when a thinking budget is spent or the model tries to end inside its
    # thinking (vLLM's reasoning_end_str). Only up to the marker: what follows (the
    # template's newlines, the answer) is the model's, under the request's grammar if any.
    reasoning_end: str | None = None


_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="chatml-tools",
            path=TEMPLATE_DIR / "chatml_tools.jinja",
            tool_parser="agentloop_hermes",
            reasoning_parser="agentloop_think",
            supports_thinking=True,
            reasoning_end="\n</think>",
        ),
        ChatTemplate(
            name="llama3-json",
            path=TEMPLATE_DIR / "llama3_json.jinja",
            tool_parser="agentloop_llama3_json",
            reasoning_parser=None,
            supports_thinking=False,
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return _TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(_TEMPLATES))
        raise KeyError(f"unknown chat template {name!r} (known: {known})") from None


def list_templates() -> list[ChatTemplate]:
    return [_TEMPLATES[name] for name in sorted(_TEMPLATES)]


@lru_cache(maxsize=None)
def template_text(name: str) -> str:
    return get_template(name).path.read_text(encoding="utf-8")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to find assistant tokens (for assistant-only
    loss); it never changes the text, so here it is a plain pass-through.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Same signature and defaults as transformers' override of Jinja's tojson.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=None)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=None)
def _compiled(name: str) -> jinja2.Template:
    return _environment().from_string(template_text(name))


def render(
    name: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Render `messages` with template `name`; extra kwargs (e.g.
    `enable_thinking`, `reasoning_effort`, `date_string`) go to the template."""
    return _compiled(name).render(
        messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **kwargs
    )
