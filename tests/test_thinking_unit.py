"""Thinking budgets as the gateway asks the engine for them (serve/protocol.py ThinkingBudgets).

Owns: a request's own budget wins (ours, `thinking_budget`, or vLLM's
`thinking_token_budget`); otherwise a thinking request gets its reasoning_effort's
budget or the default, capped at half its max_tokens; a request that does not
think gets none; a template without thinking refuses a budget with a 400. The
engine side (the budget and the closing of thinking) is tests/test_thinking.py.
"""

from __future__ import annotations

import pytest

from agentloop.serve import protocol
from agentloop.serve.errors import InvalidRequest

BUDGETS = protocol.ThinkingBudgets(default=1024, by_effort={"low": 256, "high": 4096})
MSG = [{"role": "user", "content": "6 times 7?"}]


def engine_body(budgets=BUDGETS, **body) -> dict:
    body = {"model": "agentloop", "messages": MSG, **body}
    return protocol.prepare(body, protocol.validate(body), "agentloop@v0000", budgets)


def test_thinking_requests_get_their_efforts_budget_or_the_default():
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    assert engine_body(**on)["thinking_token_budget"] == 1024
    assert engine_body(reasoning_effort="low")["thinking_token_budget"] == 256
    assert engine_body(reasoning_effort="high")["thinking_token_budget"] == 4096
    assert engine_body(reasoning_effort="medium")["thinking_token_budget"] == 1024  # unmapped: the default
    # Capped at half of max_tokens, so the answer has room.
    assert engine_body(reasoning_effort="high", max_tokens=512)["thinking_token_budget"] == 256
    assert engine_body(reasoning_effort="low", max_completion_tokens=100)["thinking_token_budget"] == 50
    # No thinking, no budget; an unbounded default sends none.
    assert "thinking_token_budget" not in engine_body()
    assert "thinking_token_budget" not in engine_body(reasoning_effort="none")
    assert "thinking_token_budget" not in engine_body(protocol.ThinkingBudgets(default=None), **on)


def test_a_requests_own_budget_is_taken_as_sent():
    got = engine_body(reasoning_effort="high", max_tokens=100, thinking_budget=90)
    assert got["thinking_token_budget"] == 90 and "thinking_budget" not in got
    assert engine_body(thinking_budget=0, reasoning_effort="low")["thinking_token_budget"] == 0
    assert engine_body(thinking_token_budget=7, reasoning_effort="low")["thinking_token_budget"] == 7  # vLLM's name


@pytest.mark.parametrize("bad", [-1, "many", 1.5, True])
def test_a_bad_budget_is_a_400(bad):
    with pytest.raises(InvalidRequest) as e:
        engine_body(thinking_budget=bad)
    assert e.value.param == "thinking_budget"


def test_a_template_without_thinking_refuses_a_budget():
    none = protocol.ThinkingBudgets(enabled=False)
    assert "thinking_token_budget" not in engine_body(none, reasoning_effort="high")
    for name in ("thinking_budget", "thinking_token_budget"):
        with pytest.raises(InvalidRequest) as e:
            engine_body(none, **{name: 10})
        assert e.value.param == name


def test_response_format_integers_get_a_bound_in_the_engines_copy_only():
    """An unbounded integer lets a grammar take digits for ever ("population": 1111...):
    the engine's schema gets JSON's safe range where the client's has no bound."""
    from agentloop.templates.json_schema import SAFE_INTEGER

    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "m": {"type": ["integer", "null"], "minimum": 0},
        "xs": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 10}},
        "ref": {"$ref": "#/$defs/count"}, "s": {"type": "string"}},
        "$defs": {"count": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    sent = engine_body(response_format=fmt)["response_format"]["json_schema"]
    props = sent["schema"]["properties"]
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (-SAFE_INTEGER, SAFE_INTEGER)
    assert (props["m"]["minimum"], props["m"]["maximum"]) == (0, SAFE_INTEGER)
    assert props["xs"]["items"] == {"type": "integer", "exclusiveMaximum": 10, "minimum": -SAFE_INTEGER}
    assert sent["schema"]["$defs"]["count"]["maximum"] == SAFE_INTEGER and props["s"] == {"type": "string"}
    assert sent["name"] == "x" and sent["strict"] is True
    assert schema["properties"]["n"] == {"type": "integer"}  # the client's (logged) body is untouched
    assert engine_body(response_format={"type": "json_object"})["response_format"] == {"type": "json_object"}
