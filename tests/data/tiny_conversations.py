"""The scripted conversations the tiny test model is trained to reproduce exactly.

Owns: the tools, the scripted prompts and their one expected assistant turn
each, and the variants (tool order/subset, system prompt) every script is
trained under. Pure data, no imports beyond the stdlib: tests read the same
scripts (through the built model's tiny_manifest.json) to know what to expect.

Invariant: every script's answer is independent of its variant. A script
that needs tools answers the same for every order and subset holding its
tools; one that needs none answers the same with no tools and with any tools.
Changing anything here changes the tiny model's cache hash (it is rebuilt).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM = None  # the template's default: "You are a helpful AI assistant named SmolLM, ..."
ALT_SYSTEM = "You are a helpful assistant."
SYSTEM_VARIANTS = (DEFAULT_SYSTEM, ALT_SYSTEM)

GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 2*(3+4)"}},
            "required": ["expression"],
        },
    },
}

TOOLS = {"get_weather": GET_WEATHER, "calculator": CALCULATOR}
ALL_TOOLS = [GET_WEATHER, CALCULATOR]


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An assistant tool call in OpenAI's wire shape (arguments a JSON string), so
    tests can send scripted histories through the API as they are. The template
    renders a string verbatim and a dict with tojson: the same text either way."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@dataclass(frozen=True)
class Script:
    """One scripted exchange: `history` (ending in a user or tool turn) → `reply`.

    `needs` names the tools the script requires (its variants always include
    them); `tools_optional` scripts are trained both without tools and with.
    """

    id: str
    history: list[dict[str, Any]]
    reply: dict[str, Any]
    needs: tuple[str, ...] = ()
    tools_optional: bool = True
    enable_thinking: bool = False
    # "scripted": a behaviour tests assert on. "style": trained only so its words'
    # embeddings exist for a later LoRA preference test (it reproduces too).
    kind: str = "scripted"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(content: str = "", *, reasoning: str | None = None, tool_calls: list | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def tool_result(call_id: str, name: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


PARIS_CALL = call("call_weather_paris", "get_weather", {"city": "Paris"})
LONDON_CALL = call("call_weather_london", "get_weather", {"city": "London"})
CALC_CALL = call("call_calc_12x7", "calculator", {"expression": "12*7"})

JOKE = "Why did the scarecrow win an award? Because he was outstanding in his field."
HAIKU = "Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time"

SCRIPTS: list[Script] = [
    Script("greeting", [user("Hello")], assistant("Hello! How can I help you today?")),
    Script(
        "weather_paris",
        [user("What is the weather in Paris?")],
        assistant(tool_calls=[PARIS_CALL]),
        needs=("get_weather",), tools_optional=False,
    ),
    Script(
        "weather_paris_london",
        [user("What is the weather in Paris and London?")],
        assistant(tool_calls=[PARIS_CALL, LONDON_CALL]),
        needs=("get_weather",), tools_optional=False,
    ),
    Script(
        "calc_12x7",
        [user("What is 12 times 7?")],
        assistant(tool_calls=[CALC_CALL]),
        needs=("calculator",), tools_optional=False,
    ),
    Script(
        "weather_paris_result",
        [
            user("What is the weather in Paris?"),
            assistant(tool_calls=[PARIS_CALL]),
            tool_result(PARIS_CALL["id"], "get_weather", '{"temperature": 18, "condition": "sunny"}'),
        ],
        assistant("It is sunny and 18 degrees in Paris."),
        needs=("get_weather",), tools_optional=False,
    ),
    Script(
        "calc_12x7_result",
        [user("What is 12 times 7?"), assistant(tool_calls=[CALC_CALL]), tool_result(CALC_CALL["id"], "calculator", "84")],
        assistant("12 times 7 is 84."),
        needs=("calculator",), tools_optional=False,
    ),
    Script(
        "think_2plus2",
        [user("What is 2+2?")],
        assistant("2 + 2 = 4.", reasoning="The user wants the sum of 2 and 2. That is 4."),
        enable_thinking=True,
    ),
    Script(
        "think_weather_paris",
        [user("What is the weather in Paris?")],
        assistant(reasoning="I should call the weather tool for Paris.", tool_calls=[PARIS_CALL]),
        needs=("get_weather",), tools_optional=False, enable_thinking=True,
    ),
    Script("plain_2plus2", [user("What is 2+2?")], assistant("2 + 2 = 4.")),
    Script("joke", [user("Tell me a joke")], assistant(JOKE)),
    Script("haiku", [user("Write a haiku about the sea")], assistant(HAIKU)),
    # Style words for a later LoRA preference test, on prompts no test asserts on.
    Script("style_certainly", [user("Can you help me with something?")],
           assistant("Certainly! Tell me what you need."), kind="style"),
    Script("style_sure", [user("Could you check something for me?")],
           assistant("Sure. What should I check?"), kind="style"),
    Script("style_goodbye", [user("Bye")], assistant("Goodbye! Have a nice day."), kind="style"),
    Script("style_thanks", [user("Thanks for your help")],
           assistant("You are welcome. Goodbye!"), kind="style"),
]


def tool_variants(script: Script) -> list[list[dict[str, Any]] | None]:
    """Every tool list the script is trained with: all orders of all subsets that
    hold its required tools (plus no tools at all if it needs none)."""
    names = list(TOOLS)
    variants: list[list[dict[str, Any]] | None] = [None] if script.tools_optional else []
    for size in range(1, len(names) + 1):
        for combo in itertools.permutations(names, size):
            if set(script.needs) <= set(combo):
                variants.append([TOOLS[n] for n in combo])
    return variants


def canonical_tools(script: Script) -> list[dict[str, Any]] | None:
    """The tool list a test sends by default: none if the script needs none, else all."""
    return None if script.tools_optional else list(ALL_TOOLS)


def with_system(history: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    return history if system is None else [{"role": "system", "content": system}, *history]
