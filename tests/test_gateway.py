"""The serving core against the real vLLM engine, through the official `openai` client.

The tiny model reproduces its scripted turns exactly under greedy decoding,
so these tests can assert exact outputs: plain and streamed answers, tool
calls (single, parallel, forced, none), thinking on/off and with tools, usage,
the request log, and the OpenAI error codes.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 64}
MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<|im_end|>", "<|im_start|>")


def script(server, sid: str) -> dict:
    return next(s for s in server.manifest["scripts"] if s["id"] == sid)


def wire_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's wire format: tool-call arguments travel as JSON strings."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {"name": c["function"]["name"],
                                   "arguments": c["function"]["arguments"] if isinstance(c["function"]["arguments"], str)
                                   else json.dumps(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def ask(client, server, sid: str, **kw):
    s = script(server, sid)
    args = {"model": "agentloop", "messages": wire_messages(s["messages"]), **GREEDY}
    if s["tools"]:
        args["tools"] = s["tools"]
    if s["enable_thinking"]:
        args["extra_body"] = {"chat_template_kwargs": {"enable_thinking": True}}
    args.update(kw)
    return client.chat.completions.create(**args)


def collect(stream) -> dict:
    """Fold a stream, checking the OpenAI streaming contract for tool calls on the way."""
    content, reasoning, calls, finish, usage, ids = "", "", {}, None, None, set()
    order = []  # which kind of text came first
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            d = ch.delta
            r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content")
            if r:
                reasoning += r
                order.append("reasoning")
            if d.content:
                content += d.content
                order.append("content")
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    # The first delta of each call carries its id, type and full name.
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                    order.append("tool")
                else:
                    assert not tc.function or not tc.function.name, "name sent twice"
                if tc.function and tc.function.arguments:
                    calls[tc.index]["arguments"] += tc.function.arguments
            if ch.finish_reason:
                finish = ch.finish_reason
    assert len(ids) == 1, ids
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)],
            "finish": finish, "usage": usage, "order": order, "id": ids.pop()}


def test_plain_answer_and_log_row(client, server):
    r = ask(client, server, "greeting")
    assert r.choices[0].message.content == script(server, "greeting")["expected"]["content"]
    assert r.choices[0].finish_reason == "stop"
    assert r.id.startswith("chatcmpl-") and r.model == "agentloop@v0000"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    row = server.wait_row(r.id)
    assert row["status_code"] == 200 and row["version"] == "v0000" and row["model"] == "agentloop"
    assert row["prompt_tokens"] == r.usage.prompt_tokens and row["caller"].startswith("key-")
    assert json.loads(row["response"])["choices"][0]["message"]["content"] == r.choices[0].message.content


@pytest.mark.parametrize("sid", ["greeting", "weather_paris", "weather_paris_london", "think_2plus2", "joke"])
def test_stream_equals_non_stream(client, server, sid):
    full = ask(client, server, sid).choices[0]
    got = collect(ask(client, server, sid, stream=True))
    assert got["content"] == (full.message.content or "")
    assert got["reasoning"] == ((full.message.model_extra or {}).get("reasoning_content") or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in full.message.tool_calls or []]
    assert got["finish"] == full.finish_reason


def test_single_tool_call(client, server):
    r = ask(client, server, "weather_paris")
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert not msg.content  # tool markup never leaks into content
    (call,) = msg.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_parallel_tool_calls_stream(client, server):
    got = collect(ask(client, server, "weather_paris_london", stream=True))
    assert got["finish"] == "tool_calls" and not got["content"]
    assert [c["name"] for c in got["calls"]] == ["get_weather", "get_weather"]
    assert [json.loads(c["arguments"]) for c in got["calls"]] == [{"city": "Paris"}, {"city": "London"}]
    assert len({c["id"] for c in got["calls"]}) == 2


def test_parallel_tool_calls_false_gives_one_call(client, server):
    r = ask(client, server, "weather_paris_london", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls or []) == 1


def test_tool_result_fed_back(client, server):
    r = ask(client, server, "weather_paris_result")
    assert r.choices[0].message.content == "It is sunny and 18 degrees in Paris."
    assert not r.choices[0].message.tool_calls


def test_tool_choice_none(client, server):
    r = ask(client, server, "weather_paris", tool_choice="none")
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(client, server, stream):
    s = script(server, "weather_paris")
    for choice, name in [("required", None), ({"type": "function", "function": {"name": "calculator"}}, "calculator")]:
        r = ask(client, server, "weather_paris", tool_choice=choice, max_tokens=96, stream=stream)
        if stream:
            got = collect(r)
            calls = [(c["name"], c["arguments"]) for c in got["calls"]]
            content = got["content"]
        else:
            m = r.choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
            content = m.content or ""
        assert calls, f"forced tool_choice={choice!r} returned no call"
        for n, args in calls:
            assert n in {t["function"]["name"] for t in s["tools"]}
            assert name is None or n == name
            assert isinstance(json.loads(args), dict)
        assert not any(t in content for t in MARKUP)


def test_thinking_on_off(client, server):
    r = ask(client, server, "think_2plus2")
    m = r.choices[0].message
    exp = script(server, "think_2plus2")["expected"]
    assert m.content == exp["content"]
    assert m.model_extra["reasoning_content"] == m.model_extra["reasoning"] == exp["reasoning_content"]
    got = collect(ask(client, server, "think_2plus2", stream=True))
    assert got["order"][0] == "reasoning" and "reasoning" not in got["order"][got["order"].index("content"):]
    assert not any(t in got["content"] + got["reasoning"] for t in MARKUP)
    # reasoning_effort is OpenAI's switch for the same thing; "none" turns it off.
    s = script(server, "think_2plus2")
    on = client.chat.completions.create(model="agentloop", messages=s["messages"], reasoning_effort="low", **GREEDY)
    assert on.choices[0].message.model_extra["reasoning_content"] == exp["reasoning_content"]
    off = client.chat.completions.create(model="agentloop", messages=s["messages"], reasoning_effort="none", **GREEDY)
    assert off.choices[0].message.content == script(server, "plain_2plus2")["expected"]["content"]
    assert not off.choices[0].message.model_extra.get("reasoning_content")


def test_thinking_with_tools(client, server):
    for stream in (False, True):
        r = ask(client, server, "think_weather_paris", stream=stream)
        if stream:
            got = collect(r)
            assert got["reasoning"] == "I should call the weather tool for Paris."
            assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [("get_weather", {"city": "Paris"})]
            assert got["order"].index("tool") > got["order"].index("reasoning")
        else:
            m = r.choices[0].message
            assert m.model_extra["reasoning_content"] == "I should call the weather tool for Paris."
            assert [c.function.name for c in m.tool_calls] == ["get_weather"] and not m.content


def test_thinking_with_forced_tool_choice_is_not_500(client, server):
    for stream in (False, True):
        r = ask(client, server, "think_weather_paris", tool_choice="required", max_tokens=128, stream=stream)
        if stream:
            got = collect(r)
            assert got["calls"] and not any(t in got["content"] for t in MARKUP)
        else:
            assert r.choices[0].message.tool_calls


def test_usage_in_stream_only_when_asked(client, server):
    got = collect(ask(client, server, "greeting", stream=True, stream_options={"include_usage": True}))
    assert got["usage"] and got["usage"].completion_tokens > 0
    got = collect(ask(client, server, "greeting", stream=True))
    assert got["usage"] is None
    # ...but the log has the token counts either way.
    row = server.wait_row(got["id"])
    assert row["completion_tokens"] > 0 and row["stream"] == 1
    assert json.loads(row["response"])["choices"][0]["message"]["content"] == \
        script(server, "greeting")["expected"]["content"]


def test_n_seed_stop_logprobs_pass_through(client, server):
    s = script(server, "joke")
    r = client.chat.completions.create(model="agentloop", messages=s["messages"], n=2, temperature=1.0, seed=7,
                                       max_completion_tokens=8, logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].logprobs.content
    assert all(len(c.logprobs.content) <= 8 for c in r.choices)
    r = client.chat.completions.create(model="agentloop", messages=s["messages"], stop=["award"], **GREEDY)
    assert r.choices[0].message.content.endswith("win an ") and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="agentloop", messages=s["messages"], temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_models_list_and_pinned_version(client, server):
    ids = [m.id for m in client.models.list().data]
    assert "agentloop" in ids and "agentloop@v0000" in ids
    assert "agentloop-base" not in ids  # the bare base model is never served
    r = client.chat.completions.create(model="agentloop@v0000", messages=script(server, "greeting")["messages"],
                                       **GREEDY)
    assert r.choices[0].message.content == script(server, "greeting")["expected"]["content"]


def test_errors_through_the_real_engine(client, server):
    msgs = script(server, "greeting")["messages"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="agentloop", messages=msgs, temperature=5)
    # Longer than the context: the engine refuses it, and that stays a 400.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="agentloop", messages=[{"role": "user", "content": "hi " * 5000}],
                                       max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="agentloop", messages=msgs, max_tokens=100000)
    r = httpx.post(f"{server.base_url}/chat/completions", content=b'{"model": "agentloop", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_count_requests(client, server):
    ask(client, server, "greeting")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'agentloop_requests_total{model="agentloop",status="200",version="v0000"}' in text
    assert "agentloop_time_to_first_token_seconds_bucket" in text


def test_empty_arguments_are_kept(client, server):
    """A call with no arguments comes back as "{}" (vLLM parsers have dropped it), streamed or not."""
    no_args = {"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                                "parameters": {"type": "object", "properties": {}}}}
    s = script(server, "weather_paris")
    choice = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        r = client.chat.completions.create(model="agentloop", messages=s["messages"], tools=[no_args, *s["tools"]],
                                           tool_choice=choice, temperature=0, max_tokens=32, stream=stream)
        if stream:
            calls = [(c["name"], c["arguments"]) for c in collect(r)["calls"]]
        else:
            calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
        assert calls and calls[0][0] == "get_time" and json.loads(calls[0][1]) == {}
