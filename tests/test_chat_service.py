"""The chat-completion path without HTTP: `ChatService.create` with a fake engine pool.

The service is what the route calls (serve/http/app.py only parses and converts);
here it runs on the real router, pool, store and log writer, with an engine that
subclasses the real `Engine`, and every outcome must leave exactly one log row.
"""

from __future__ import annotations

import asyncio

import pytest

from agentloop.serve.engine.client import EnginePool
from agentloop.serve.engine.router import ModelRouter
from agentloop.serve.errors import InvalidRequest, ModelNotFound
from agentloop.serve.metrics import Metrics
from agentloop.serve.services.chat import ChatService
from agentloop.serve.store.db import Store
from agentloop.serve.store.logwriter import LogWriter
from tests.test_gateway_unit import FakeEngine

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def parts(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    writer = LogWriter(store)
    router = ModelRouter("agentloop")
    router.add_version("v0000", str(tmp_path / "v0000"), live=True)
    router.add_version("v0001", str(tmp_path / "v0001"))
    engine = FakeEngine()
    service = ChatService(router, EnginePool([engine]), writer, Metrics())
    yield service, store, writer, router, engine
    writer.close()
    store.close()


def _row(store, writer, cid):
    assert writer.flush()
    return store.get_completion(cid)


def test_non_stream_resolves_calls_fixes_and_logs(parts):
    service, store, writer, router, engine = parts
    result = asyncio.run(service.create({"model": "agentloop", "messages": MSG, "reasoning_effort": "low"},
                                        caller="alice", max_tokens_ceiling=4096))
    assert result.events is None and result.response["id"] == result.id
    msg = result.response["choices"][0]["message"]
    assert msg["content"] == "Hi there" and msg["reasoning_content"] == msg["reasoning"] == "think"
    sent = engine.bodies[0]
    assert sent["model"] == "agentloop@v0000"           # the alias resolved to the live version
    assert sent["chat_template_kwargs"] == {"enable_thinking": True} and "reasoning_effort" not in sent
    assert router.inflight == {}                         # released
    row = _row(store, writer, result.id)
    assert (row["caller"], row["version"], row["status_code"], row["completion_tokens"]) == ("alice", "v0000", 200, 3)


def test_stream_relays_events_and_logs_the_assembled_answer(parts):
    service, store, writer, router, engine = parts

    async def run():
        result = await service.create({"model": "agentloop@v0001", "messages": MSG, "stream": True},
                                      caller="bob", max_tokens_ceiling=4096)
        assert router.inflight == {"agentloop@v0001": 1}  # held for the whole stream
        return result.id, [e async for e in result.events]

    cid, events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    assert all(cid in e for e in events[:-1])
    assert not any('"usage"' in e for e in events)       # the client did not ask for usage
    assert router.inflight == {}
    row = _row(store, writer, cid)
    assert row["version"] == "v0001" and row["status_code"] == 200 and row["prompt_tokens"] == 7
    call = row["response"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": "{\"a\": 1}"}


def test_refusals_raise_domain_errors_and_are_logged(parts):
    service, store, writer, router, engine = parts
    with pytest.raises(ModelNotFound):
        asyncio.run(service.create({"model": "nope", "messages": MSG}, caller="c", max_tokens_ceiling=10))
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(service.create({"model": "agentloop", "messages": MSG, "max_tokens": 11},
                                   caller="c", max_tokens_ceiling=10))
    assert e.value.param == "max_tokens" and router.inflight == {}
    assert not engine.bodies                             # neither reached the engine
    assert writer.flush()
    rows = store.list_completions(limit=10)
    assert sorted(r["status_code"] for r in rows) == [400, 404]


def test_an_unset_max_tokens_is_capped_at_the_ceiling_below_the_context(parts):
    service, store, writer, router, engine = parts
    asyncio.run(service.create({"model": "agentloop", "messages": MSG}, caller="c", max_tokens_ceiling=100))
    asyncio.run(service.create({"model": "agentloop", "messages": MSG}, caller="c", max_tokens_ceiling=4096))
    assert engine.bodies[0]["max_tokens"] == 100
    assert "max_tokens" not in engine.bodies[1]          # the context (2048) bounds it already


def test_no_ceiling_leaves_the_context_as_the_only_bound(parts):
    """AGENTLOOP_LIMIT_MAX_TOKENS unset: nothing is capped or refused here; a prompt plus
    max_tokens over the context is the engine's own 400 (tests/test_context.py, real engine)."""
    service, store, writer, router, engine = parts
    for extra in ({}, {"max_completion_tokens": 100000}):
        asyncio.run(service.create({"model": "agentloop", "messages": MSG, **extra}, caller="c",
                                   max_tokens_ceiling=None))
    assert "max_tokens" not in engine.bodies[0] and engine.bodies[1]["max_completion_tokens"] == 100000


def test_the_context_is_the_smallest_ready_engines(parts):
    service, store, writer, router, engine = parts
    pool = EnginePool([FakeEngine(max_model_len=8192), FakeEngine(max_model_len=4096), FakeEngine(up=False, max_model_len=16)])
    assert pool.max_model_len == 4096
    assert EnginePool([FakeEngine(max_model_len=None)]).max_model_len is None
    # An unknown context sends the cap: it may be below the context, and vLLM clips what the prompt leaves.
    engine.max_model_len = None
    asyncio.run(service.create({"model": "agentloop", "messages": MSG}, caller="c", max_tokens_ceiling=4096))
    assert engine.bodies[0]["max_tokens"] == 4096


def test_generate_serves_a_pinned_version_through_the_chat_path_unlogged(parts):
    """The loop's samples (ChatService.generate): the engine body is the chat path's, the answer is
    fixed like a user's, the version's in-flight count is released, and nothing is logged."""
    service, store, writer, router, engine = parts
    resp = asyncio.run(service.generate({"model": "ignored", "messages": MSG, "n": 3, "temperature": 1.0,
                                         "stream": True, "reasoning_effort": "low"}, model="agentloop@v0001"))
    sent = engine.bodies[-1]
    assert sent["model"] == "agentloop@v0001" and sent["n"] == 3 and sent["stream"] is False
    assert sent["chat_template_kwargs"] == {"enable_thinking": True} and "reasoning_effort" not in sent
    msg = resp["choices"][0]["message"]
    assert msg["content"] == "Hi there" and msg["reasoning_content"] == "think" and resp["id"].startswith("chatcmpl-")
    assert router.inflight == {}
    assert writer.flush() and store.count_completions() == 0
    with pytest.raises(InvalidRequest):
        asyncio.run(service.generate({"messages": MSG, "temperature": "hot"}, model="agentloop@v0001"))
    with pytest.raises(ModelNotFound):
        asyncio.run(service.generate({"messages": MSG}, model="agentloop@v0042"))
    assert router.inflight == {} and store.count_completions() == 0
