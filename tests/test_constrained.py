"""Schema-constrained tool calls through the gateway and the real vLLM engine (tiny model).

Owns the end-to-end guarantees of the structural-tag decoding set up by
serve/inside_vllm/parsers.py: a forced call validates against its tool's schema
(nested objects, enums, arrays, anyOf, integers vs numbers), streamed or not;
a forced call cut by max_tokens is finish_reason "length" with no call and no
markup; in auto mode whatever comes back as a call validates, even for a
schema the tiny model would break unconstrained; a schema the grammar backend
cannot use is an OpenAI-shaped 400; `strict: true` and `parallel_tool_calls`
hold. The tiny model is random outside its scripts, so the schemas here bound
every string, number and array: a call must then close within max_tokens, and
the tests can demand one.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.test_gateway import MARKUP, collect, script, wire_messages

CITY = {"type": "string", "maxLength": 12}
COUNTRY = {"type": "string", "enum": ["FR", "GB", "US"]}
# Nested object, enums, bounded array, integer range, anyOf, optional fields.
FORECAST = {
    "type": "object",
    "properties": {
        "location": {"type": "object", "properties": {"city": CITY, "country": COUNTRY},
                     "required": ["city", "country"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "fields": {"type": "array", "items": {"type": "string", "enum": ["temp", "wind", "rain"]},
                   "minItems": 1, "maxItems": 3},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "detail": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]},
    },
    "required": ["location", "days", "fields"],
}
# What the tiny model writes unconstrained for weather_paris is {"city": "Paris"}: invalid here.
NESTED_WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "object", "properties": {"city": CITY, "country": COUNTRY},
                                "required": ["city", "country"]}},
    "required": ["location"],
}


def tool(name: str, parameters: dict, **extra) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **extra}}


def answer(client, server, tools, stream: bool, **kw) -> dict:
    """(content, calls, finish) of one weather_paris turn, streamed or not."""
    s = script(server, "weather_paris")
    args = {"model": "agentloop", "messages": wire_messages(s["messages"]), "tools": tools,
            "temperature": 0, "max_tokens": 160, **kw}
    if stream:
        got = collect(client.chat.completions.create(stream=True, **args))
        return {"content": got["content"], "calls": [(c["name"], c["arguments"]) for c in got["calls"]],
                "finish": got["finish"]}
    choice = client.chat.completions.create(**args).choices[0]
    return {"content": choice.message.content,
            "calls": [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []],
            "finish": choice.finish_reason}


def assert_valid_calls(got: dict, tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for name, arguments in got["calls"]:
        assert name in schemas, name
        jsonschema.validate(json.loads(arguments), schemas[name])
    assert not any(m in (got["content"] or "") for m in MARKUP), got["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_call_with_nested_enum_array_schema_validates(client, server, stream, choice):
    tools = [tool("get_forecast", FORECAST), tool("calculator", {
        "type": "object", "properties": {"expression": {"type": "string", "maxLength": 20}},
        "required": ["expression"]})]
    tool_choice = {"type": "function", "function": {"name": "get_forecast"}} if choice == "named" else "required"
    got = answer(client, server, tools, stream, tool_choice=tool_choice)
    assert got["calls"], got
    if choice == "named":
        assert got["finish"] == "stop"
    else:
        # `required` allows more calls after the first (joined as the template joins
        # them); the tiny model may keep adding calls until the cap: then "length".
        assert got["finish"] in ("tool_calls", "length")
    assert got["content"] == ("" if stream else None)  # OpenAI's null, never vLLM's ""
    assert_valid_calls(got, tools)
    if choice == "named":
        assert {n for n, _ in got["calls"]} == {"get_forecast"}


def test_forced_call_stream_equals_non_stream(client, server):
    tools = [tool("get_forecast", FORECAST)]
    a = answer(client, server, tools, False, tool_choice="required")
    b = answer(client, server, tools, True, tool_choice="required")
    assert [(n, json.loads(x)) for n, x in a["calls"]] == [(n, json.loads(x)) for n, x in b["calls"]]
    assert a["finish"] == b["finish"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("choice", ["required", "named"])
@pytest.mark.parametrize("max_tokens", [2, 5, 12])
def test_cut_off_forced_call_is_length_with_no_call_and_no_markup(client, server, stream, choice, max_tokens):
    s = script(server, "weather_paris")
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"
    got = answer(client, server, s["tools"], stream, tool_choice=tool_choice, max_tokens=max_tokens)
    assert got["finish"] == "length"
    assert got["calls"] == []
    # No half call as content; non-streamed, the gateway turns vLLM's "" into OpenAI's null.
    assert got["content"] == ("" if stream else None), got


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_parallel_calls_cut_after_the_first_are_length_with_the_complete_call(client, server, stream):
    """Two forced calls, the cap falling inside the second: the first, complete call
    comes back and the turn says it was cut ("length"), never "tool_calls"."""
    s = script(server, "weather_paris_london")
    args = {"model": "agentloop", "messages": wire_messages(s["messages"]), "tools": s["tools"],
            "temperature": 0, "tool_choice": "required"}
    full = client.chat.completions.create(max_tokens=160, **args)
    assert len(full.choices[0].message.tool_calls) == 2, full
    total = full.usage.completion_tokens
    seen = []
    for cap in range(total // 3, total):
        if stream:
            got = collect(client.chat.completions.create(max_tokens=cap, stream=True, **args))
            calls, finish = [(c["name"], c["arguments"]) for c in got["calls"]], got["finish"]
        else:
            r = client.chat.completions.create(max_tokens=cap, **args)
            calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
            finish = r.choices[0].finish_reason
        assert finish == "length", (cap, calls)
        # Only whole calls, in order (at the last caps both are whole, the end of turn is cut).
        assert [json.loads(a) for _, a in calls] == [{"city": "Paris"}, {"city": "London"}][:len(calls)]
        seen.append(len(calls))
    assert 1 in seen and 0 in seen, seen  # the cut fell both inside the first call and after it


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("max_tokens", [6, 24, 160])
def test_auto_cut_or_constrained_call_is_never_half_or_invalid(client, server, stream, max_tokens):
    """Unconstrained the tiny model calls get_weather({"city": "Paris"}), which fails this
    schema: in auto mode what comes back is a call that validates, or no call at all."""
    tools = [tool("get_weather", NESTED_WEATHER)]
    got = answer(client, server, tools, stream, max_tokens=max_tokens)
    assert_valid_calls(got, tools)
    if not got["calls"]:
        assert got["finish"] in ("length", "stop")
    for _, arguments in got["calls"]:
        assert json.loads(arguments) != {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("schema,reason", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "$defs"),
    ({"type": "object", "properties": {"a": {"type": "foo"}}}, 'Unsupported type "foo"'),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}, "Lookbehind"),
    ({"type": "string"}, '"type": "object"'),
], ids=["ref-to-nowhere", "unknown-type", "lookbehind-pattern", "not-an-object"])
def test_unusable_schema_is_an_openai_400(client, server, stream, schema, reason):
    s = script(server, "weather_paris")
    tools = [s["tools"][0], tool("broken", schema)]
    with pytest.raises(openai.BadRequestError) as e:
        answer(client, server, tools, stream, tool_choice="auto", max_tokens=4)
    err = e.value.body if "message" in (e.value.body or {}) else (e.value.body or {}).get("error", {})
    assert set(err) >= {"message", "type", "param", "code"}
    assert "'broken'" in err["message"] and reason in err["message"]
    assert err["param"] == "tools[1].function.parameters"


def test_recursive_schema_is_accepted_and_constrained(client, server):
    node = {"type": "object", "properties": {"name": CITY, "child": {"$ref": "#/$defs/node"}},
            "required": ["name"]}
    schema = {"type": "object", "$defs": {"node": node}, "properties": {"root": {"$ref": "#/$defs/node"}},
              "required": ["root"]}
    tools = [tool("tree", schema)]
    got = answer(client, server, tools, False, tool_choice="required", max_tokens=48)
    assert_valid_calls(got, tools)  # a call, or cut off by max_tokens: never an invalid one
    assert got["calls"] or got["finish"] == "length"


def test_strict_true_is_honoured(client, server):
    strict = tool("get_weather", NESTED_WEATHER, strict=True)
    got = answer(client, server, [strict], False, tool_choice="required")
    assert got["calls"]
    assert_valid_calls(got, [strict])


def test_parallel_tool_calls_false_bounds_forced_and_auto(client, server):
    s = script(server, "weather_paris_london")
    base = {"model": "agentloop", "messages": wire_messages(s["messages"]), "tools": s["tools"],
            "temperature": 0, "max_tokens": 96}
    both = client.chat.completions.create(**base).choices[0].message.tool_calls
    assert len(both) == 2  # the script: Paris and London
    for tool_choice in ("auto", "required"):
        one = client.chat.completions.create(**base, tool_choice=tool_choice, parallel_tool_calls=False)
        assert len(one.choices[0].message.tool_calls) == 1


def test_schema_errors_reach_the_client_directly_from_the_engine_too(server):
    """The 400 comes from vLLM itself (the plugin), not from gateway-side checks."""
    s = script(server, "weather_paris")
    body = {"model": "agentloop-base", "messages": s["messages"], "max_tokens": 4,
            "tools": [tool("broken", {"type": "object", "properties": {"a": {"type": "foo"}}})]}
    r = httpx.post(f"{server.engine_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"
