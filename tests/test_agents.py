"""Agents on the real gateway + vLLM engine (the session ``server`` fixture, tiny scripted model).

The tiny model was trained on the weather/calculator scripts; our tools are
built from typed functions (tools/registry.py), so their schema text differs
slightly from the training one. It still picks get_weather by itself; where
it cannot choose (the calculator), the agent forces the choice.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Literal

import pytest
from langchain_core.messages import ToolMessage

from agentloop.agents import Agent
from agentloop.tools import ToolRegistry, evaluate

PARIS = "What is the weather in Paris?"
BOTH = "What is the weather in Paris and London?"
SUNNY = {"temperature": 18, "condition": "sunny"}


def expected(server, sid: str) -> dict:
    return next(s for s in server.manifest["scripts"] if s["id"] == sid)["expected"]


def registry(weather=None, timeout: float = 5.0) -> ToolRegistry:
    reg = ToolRegistry(default_timeout=timeout)

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
        """Get the current weather in a city.

        Args:
            city: The city name, e.g. Paris
        """
        return weather(city) if weather else SUNNY

    def calculator(expression: str) -> float:
        """Evaluate an arithmetic expression.

        Args:
            expression: e.g. 2*(3+4)
        """
        return evaluate(expression)

    reg.register(get_weather)
    reg.register(calculator)
    return reg


def agent(server, reg: ToolRegistry, **kw) -> Agent:
    return Agent(reg, url=server.url, api_key="test-key", max_tokens=64, **kw)


def logged_request(server, cid: str) -> dict:
    return json.loads(server.wait_row(cid)["request"])


def feedback_rows(server, ids: list[str]) -> list[tuple]:
    with server.db() as con:
        return con.execute(
            f"SELECT completion_id, type, value, correction FROM feedback WHERE completion_id IN "
            f"({','.join('?' * len(ids))}) ORDER BY created_at, rowid", ids).fetchall()


def test_agent_calls_a_tool_and_answers_from_its_result(server):
    a = agent(server, registry())
    run = a.run(PARIS)
    assert [(c["name"], c["args"]) for c in run.tool_calls] == [("get_weather", {"city": "Paris"})]
    (res,) = run.tool_results
    assert json.loads(res.content) == SUNNY and res.status == "success"
    assert res.tool_call_id == run.tool_calls[0]["id"]
    assert run.answer == expected(server, "weather_paris_result")["content"] == "It is sunny and 18 degrees in Paris."
    assert not run.hit_step_limit and run.model_calls == 2
    # Every model call of the run is a logged completion of this caller.
    assert len(set(run.completion_ids)) == 2 and all(c.startswith("chatcmpl-") for c in run.completion_ids)
    first, second = (logged_request(server, c) for c in run.completion_ids)
    assert first["messages"][-1] == {"role": "user", "content": PARIS}
    assert second["messages"][-1]["role"] == "tool" and json.loads(second["messages"][-1]["content"]) == SUNNY
    assert {t["function"]["name"] for t in first["tools"]} == {"get_weather", "calculator"}
    assert first["chat_template_kwargs"] == {"enable_thinking": False}


def test_forced_tool_choice_is_for_the_first_call_only(server):
    a = agent(server, registry(), force_tool="get_weather")
    run = a.run(PARIS)
    first, second = (logged_request(server, c) for c in run.completion_ids)
    assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert second.get("tool_choice") in (None, "auto")  # answering from the result is free
    assert run.answer == "It is sunny and 18 degrees in Paris."
    # Per-run override: "required" forces some tool; None lets the model decide.
    run = a.run(PARIS, force_tool="required")
    assert logged_request(server, run.completion_ids[0])["tool_choice"] == "required"
    assert [c["name"] for c in run.tool_calls] == ["get_weather"]
    run = a.run(PARIS, force_tool=None)
    assert logged_request(server, run.completion_ids[0]).get("tool_choice") in (None, "auto")
    with pytest.raises(ValueError, match="not a registered tool"):
        a.run(PARIS, force_tool="teleport")


def test_forcing_a_tool_the_model_cannot_choose_and_recovering_from_its_error(server):
    """The tiny model cannot fill the calculator's argument; a bad call must not crash the run."""
    a = agent(server, registry(), force_tool="calculator")
    run = a.run("What is 12 times 7?")
    assert logged_request(server, run.completion_ids[0])["tool_choice"]["function"]["name"] == "calculator"
    (call,) = run.tool_calls
    assert call["name"] == "calculator"
    (res,) = run.tool_results
    # Whatever the model wrote, the result is what our calculator says about it.
    assert res.content == a.registry.run("calculator", call["args"]).content
    assert run.model_calls == 2 and isinstance(run.answer, str)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_parallel_tool_calls_of_one_turn_run_concurrently(server, mode):
    spans = []

    def slow(city: str) -> dict:
        t0 = time.monotonic()
        time.sleep(0.5)
        spans.append((city, t0, time.monotonic()))
        return {**SUNNY, "city": city}

    a = agent(server, registry(slow))
    run = a.run(BOTH) if mode == "sync" else asyncio.run(a.arun(BOTH))
    assert [(c["name"], c["args"]["city"]) for c in run.tool_calls] == [("get_weather", "Paris"),
                                                                       ("get_weather", "London")]
    assert len(spans) == 2
    took = max(e for _, _, e in spans) - min(s for _, s, _ in spans)
    assert took < 0.9, f"two 0.5 s tools took {took:.2f} s: not concurrent"
    # Results come back in the calls' order, each answering its own call.
    assert [m.tool_call_id for m in run.tool_results] == [c["id"] for c in run.tool_calls]
    assert [json.loads(m.content)["city"] for m in run.tool_results] == ["Paris", "London"]
    # The model's next request carries both results after the assistant turn, in order.
    nxt = logged_request(server, run.completion_ids[1])["messages"]
    assert [m["role"] for m in nxt[-3:]] == ["assistant", "tool", "tool"]
    assert [m["tool_call_id"] for m in nxt[-2:]] == [c["id"] for c in nxt[-3]["tool_calls"]]


def test_registry_runs_the_models_parallel_calls_with_their_ids(server, client):
    """The same through the plain openai client: the model's calls → registry.execute → tool messages."""
    spans = []

    def slow(city: str) -> dict:
        t0 = time.monotonic()
        time.sleep(0.5)
        spans.append((t0, time.monotonic()))
        return {**SUNNY, "city": city}

    reg = registry(slow)
    r = client.chat.completions.create(model="agentloop", messages=[{"role": "user", "content": BOTH}],
                                       tools=reg.openai_tools(), temperature=0, max_tokens=64)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 2
    t0 = time.monotonic()
    results = reg.execute(calls)
    assert time.monotonic() - t0 < 0.9
    assert [m.message()["tool_call_id"] for m in results] == [c.id for c in calls]
    assert [json.loads(m.content)["city"] for m in results] == ["Paris", "London"]


def test_a_raising_tool_becomes_an_error_result(server):
    def down(city: str) -> dict:
        raise RuntimeError(f"weather service for {city} is down")

    run = agent(server, registry(down)).run(PARIS)
    (res,) = run.tool_results
    assert isinstance(res, ToolMessage) and res.status == "error"
    assert res.content == "Error: tool 'get_weather' failed: RuntimeError: weather service for Paris is down"
    assert run.model_calls == 2  # the model saw the error and answered
    sent = logged_request(server, run.completion_ids[1])["messages"][-1]
    assert sent["role"] == "tool" and "weather service for Paris is down" in sent["content"]


def test_a_hanging_tool_times_out_into_a_result(server):
    def stuck(city: str) -> dict:
        time.sleep(10)
        return SUNNY

    t0 = time.monotonic()
    run = agent(server, registry(stuck, timeout=0.3)).run(PARIS)
    assert time.monotonic() - t0 < 8  # two model calls and a 0.3 s timeout, not the 10 s sleep
    (res,) = run.tool_results
    assert res.status == "error" and res.content == "Error: tool 'get_weather' timed out after 0.3 s."
    assert run.model_calls == 2


def test_step_limit_ends_the_run(server):
    run = agent(server, registry(), max_steps=1).run(PARIS)
    assert run.hit_step_limit and run.model_calls == 1
    assert [c["name"] for c in run.tool_calls] == ["get_weather"] and len(run.tool_results) == 1
    assert "limit" in run.answer.lower()


def test_thinking_is_a_switch(server):
    a = agent(server, registry(), thinking=True)
    run = a.run(PARIS)
    first = server.wait_row(run.completion_ids[0])
    assert json.loads(first["request"])["chat_template_kwargs"] == {"enable_thinking": True}
    msg = json.loads(first["response"])["choices"][0]["message"]
    assert msg["reasoning_content"] and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    run = a.run(PARIS, thinking=False)  # per run, without rebuilding the agent
    assert logged_request(server, run.completion_ids[0])["chat_template_kwargs"] == {"enable_thinking": False}


def test_trajectory_feedback_reaches_the_learning_loop(server):
    a = agent(server, registry())
    run = a.run(PARIS)
    ids = run.completion_ids
    rows = a.feedback(run, +1)
    assert [(r["type"], r["completion_id"], r["value"]) for r in rows] == [("thumbs", i, 1) for i in ids]
    fixed = a.feedback(run, "It is sunny in Paris, 18 °C.", comment="more concise")
    assert [(r["type"], r["completion_id"]) for r in fixed] == [("correction", ids[-1])]
    stored = feedback_rows(server, ids)
    assert [(c, t, v) for c, t, v, _ in stored] == [(ids[0], "thumbs", 1), (ids[1], "thumbs", 1),
                                                    (ids[1], "correction", None)]
    assert json.loads(stored[-1][3]) == {"role": "assistant", "content": "It is sunny in Paris, 18 °C."}
    # Sending the same feedback again (a retry) stores nothing new: it is idempotent.
    assert [r["id"] for r in a.feedback(run, +1)] == [r["id"] for r in rows]
    assert len(feedback_rows(server, ids)) == 3
    with pytest.raises(TypeError):
        a.feedback(run, True)
    a.close()


def _down(city: str) -> dict:
    raise RuntimeError(f"weather service for {city} is down")


def outcomes(server, cid: str) -> list[dict]:
    """The tool_outcome grades of completion `cid` (recorded off the response path: polled)."""
    import httpx

    from tests.conftest import ADMIN_KEY

    deadline = time.monotonic() + 15
    while True:
        rows = httpx.get(f"{server.url}/admin/grades", params={"completion_id": cid, "grader": "tool_outcome"},
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()["data"]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_the_agents_tool_outcomes_are_graded_with_no_code_of_its_users(server):
    """A tool that raised, and one that answered: the gateway grades the calls that made them
    (tool_outcome) from the results the agent sends back, nothing asked of the agent's user."""
    bad = agent(server, registry(_down)).run(PARIS)
    assert bad.tool_results and bad.tool_results[0].status == "error"
    (g,) = outcomes(server, bad.completion_ids[0])
    assert g["score"] == 0.0 and "weather service for Paris is down" in g["reason"]
    good = agent(server, registry()).run(PARIS)
    assert good.tool_results and good.tool_results[0].status != "error"
    (g,) = outcomes(server, good.completion_ids[0])
    assert g["score"] == 1.0 and "get_weather answered" in g["reason"]


def test_the_chatbots_tool_outcomes_are_graded_with_no_code_of_its_users(server):
    """The same for the retry-wrapped Chatbot's tool rounds (agents/chatbot.py)."""
    from agentloop.agents.chatbot import Chatbot

    bot = Chatbot(server.url, "test-key", policy=None, tools=registry(_down), use_tools=True, max_tokens=64)
    bad = bot.ask(PARIS)
    assert bad.tool_results and not bad.tool_results[0].ok
    (g,) = outcomes(server, bad.completion_ids[0])
    assert g["score"] == 0.0 and "weather service for Paris is down" in g["reason"]
    good = Chatbot(server.url, "test-key", policy=None, tools=registry(), use_tools=True, max_tokens=64).ask(PARIS)
    assert good.tool_results and good.tool_results[0].ok
    (g,) = outcomes(server, good.completion_ids[0])
    assert g["score"] == 1.0 and "get_weather answered" in g["reason"]
