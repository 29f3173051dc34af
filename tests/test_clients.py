"""Off-the-shelf clients against the gateway with no special options: ``openai`` and LangChain's ``ChatOpenAI``.

Only a base URL and a key: if these need anything agentloop-specific, the
gateway is not the drop-in OpenAI server it claims to be.
"""

from __future__ import annotations

import json

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai import OpenAI

from tests.data.tiny_conversations import ALL_TOOLS, GET_WEATHER
from agentloop.tools import ToolRegistry

GREETING = "Hello! How can I help you today?"
PARIS = "What is the weather in Paris?"


def llm(server) -> ChatOpenAI:
    return ChatOpenAI(model="agentloop", base_url=server.base_url, api_key="test-key", temperature=0, max_tokens=48)


def test_openai_client_as_is(server):
    client = OpenAI(base_url=server.base_url, api_key="test-key")
    r = client.chat.completions.create(model="agentloop", messages=[{"role": "user", "content": "Hello"}])
    assert r.choices[0].message.content == GREETING and r.id.startswith("chatcmpl-")
    r = client.chat.completions.create(model="agentloop", messages=[{"role": "user", "content": PARIS}],
                                       tools=[GET_WEATHER], tool_choice="required", max_tokens=48)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="agentloop", messages=[{"role": "user", "content": "Hello"}], stream=True) if c.choices)
    assert text == GREETING


def test_chatopenai_invoke_and_stream(server):
    m = llm(server)
    out = m.invoke("Hello")
    assert isinstance(out, AIMessage) and out.content == GREETING
    assert out.response_metadata["id"].startswith("chatcmpl-")  # the handle feedback needs
    assert server.wait_row(out.response_metadata["id"])["status_code"] == 200
    assert "".join(c.content for c in m.stream("Hello")) == GREETING


def test_chatopenai_bind_tools_with_forced_choice(server):
    m = llm(server)
    # Forced by name: the server constrains the output to that tool's call.
    out = m.bind_tools(ALL_TOOLS, tool_choice="get_weather").invoke(PARIS)
    assert [(c["name"], c["args"]) for c in out.tool_calls] == [("get_weather", {"city": "Paris"})]
    row = json.loads(server.wait_row(out.response_metadata["id"])["request"])
    assert row["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # "any" is LangChain's word for OpenAI's "required".
    out = m.bind_tools(ALL_TOOLS, tool_choice="any").invoke(PARIS)
    assert out.tool_calls and out.tool_calls[0]["name"] in {"get_weather", "calculator"}
    # Unforced, the tiny model picks the tool itself, and answers from the result.
    out = m.bind_tools(ALL_TOOLS).invoke(PARIS)
    (call,) = out.tool_calls
    final = m.bind_tools(ALL_TOOLS).invoke([
        HumanMessage(PARIS), out,
        ToolMessage('{"temperature": 18, "condition": "sunny"}', tool_call_id=call["id"])])
    assert final.content == "It is sunny and 18 degrees in Paris." and not final.tool_calls


def test_chatopenai_with_registry_tools(server):
    reg = ToolRegistry()

    @reg.register
    def get_weather(city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: The city name, e.g. Paris
        """
        return {"temperature": 18, "condition": "sunny"}

    out = llm(server).bind_tools(reg.langchain_tools(), tool_choice="get_weather").invoke(PARIS)
    (call,) = out.tool_calls
    assert call["name"] == "get_weather"
    (tool,) = reg.langchain_tools()
    res = tool.invoke({**call, "type": "tool_call"})
    assert res.tool_call_id == call["id"] and json.loads(res.content) == {"temperature": 18, "condition": "sunny"}
