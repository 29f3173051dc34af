"""Thinking that always answers, on the real engine (tiny model) through the gateway.

Owns the end-to-end guarantees of the thinking budget (vLLM's
thinking_token_budget with the template's end string, serve/engine/supervisor.py)
and of CloseThinking (serve/inside_vllm/think_end.py): with room for an answer, a
thinking request returns non-empty content or a tool call, streamed and not, with
and without tools, on scripted and off-script prompts; a budget bounds the
thinking; the log keeps the reasoning. The tiny model is random off its scripts,
which is the point: whatever it would do, the turn still ends in an answer.
"""

from __future__ import annotations

import json

import pytest

from tests.test_gateway import collect, script, wire_messages

OFF_SCRIPT = [{"role": "user", "content": "Which is larger, a cat or a mouse? Think first."}]


def run(client, messages, stream: bool, **kw) -> dict:
    args = {"model": "agentloop", "messages": messages, "temperature": 0, "max_tokens": 64,
            "extra_body": {"chat_template_kwargs": {"enable_thinking": True}, **kw.pop("extra_body", {})}}
    args.update(kw)
    if stream:
        return collect(client.chat.completions.create(stream=True, **args))
    r = client.chat.completions.create(**args)
    m = r.choices[0].message
    return {"content": m.content or "", "reasoning": m.model_extra.get("reasoning") or "", "id": r.id,
            "calls": [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls or []],
            "finish": r.choices[0].finish_reason, "usage": r.usage}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("budget", [None, 2, 8])
@pytest.mark.parametrize("case", ["scripted", "off_script", "seeded"])
def test_a_thinking_request_always_answers(client, server, case, budget, stream):
    messages = wire_messages(script(server, "think_2plus2")["messages"]) if case == "scripted" else OFF_SCRIPT
    extra = {} if budget is None else {"thinking_budget": budget}
    kw = {"seed": 7, "temperature": 1.0} if case == "seeded" else {}
    got = run(client, messages, stream, extra_body=extra, **kw)
    assert got["content"].strip(), got
    # The reasoning is clean. (A scripted model cut short may go on to write its memorised
    # thinking, markup and all, as its answer: that is text it chose, after the close.)
    assert "</think>" not in got["reasoning"]
    if budget is not None:  # the reasoning is at most the budget's tokens (a token is a few characters here)
        assert len(got["reasoning"]) <= budget * 16, got


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_thinking_with_tools_answers_or_calls(client, server, choice, stream):
    s = script(server, "think_weather_paris")
    for messages in (wire_messages(s["messages"]), OFF_SCRIPT):
        got = run(client, messages, stream, tools=s["tools"], tool_choice=choice, max_tokens=96,
                  extra_body={"thinking_budget": 12})
        assert got["content"].strip() or got["calls"], got
        for c in got["calls"]:
            assert isinstance(json.loads(c["arguments"]), dict)
        if choice == "required":
            assert got["calls"] and not got["content"].strip()


def test_the_log_keeps_the_reasoning_and_the_answer(client, server):
    got = run(client, OFF_SCRIPT, False, extra_body={"thinking_budget": 4})
    row = server.wait_row(got["id"])
    message = json.loads(row["response"])["choices"][0]["message"]
    assert message["content"] == got["content"] and message["reasoning"] == got["reasoning"]
    assert json.loads(row["request"])["thinking_budget"] == 4  # as the client sent it
