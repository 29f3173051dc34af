"""Gateway HTTP behaviour against a fake engine (a subclass of the real Engine).

These run in-process in milliseconds and pin down the conversion layer: error
shapes and codes, stream relay and assembly, usage handling, the reasoning
field names, and the request log. The real-engine tests are in test_gateway.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from agentloop.serve.http.app import create_app
from agentloop.serve.engine.client import Engine
from agentloop.serve.errors import EngineError, EngineUnreachable
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store


class FakeEngine(Engine):
    """Answers like vLLM does: a scripted reply, streamed in pieces."""

    def __init__(self, *, up: bool = True, fail: Exception | None = None, max_model_len: int | None = 2048):
        self.url = "fake://engine"
        self.inflight = 0
        self.max_model_len = max_model_len  # what vLLM's /v1/models reports
        self.up = up
        self.fail = fail
        self.bodies: list[dict] = []

    @property
    def ready(self) -> bool:
        return self.up

    async def load_adapter(self, name, path):
        return None

    async def unload_adapter(self, name):
        return None

    async def chat(self, body):
        self.bodies.append(body)
        if self.fail is not None:
            raise self.fail
        rid = "chatcmpl-" + body.get("_request_id", "x")
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if not body.get("stream"):
            yield {"id": rid, "object": "chat.completion", "created": 1, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hi there", "reasoning": "think"}}],
                   "usage": usage}
            return
        base = {"id": rid, "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        yield {**base, "choices": [{"index": 0, "delta": {"reasoning": "think"}}]}
        yield {**base, "choices": [{"index": 0, "delta": {"content": "Hi "}}]}
        yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}
        yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {**base, "choices": [], "usage": usage}


def make_client(tmp_path, engine: FakeEngine) -> TestClient:
    settings = Settings(home=tmp_path, alias="agentloop")
    app = create_app(settings, engines=[engine])
    app.state.gw.router.add_version("v0000", str(tmp_path / "adapters" / "v0000"), live=True)
    return TestClient(app)


def rows(tmp_path, client) -> list[dict]:
    client.app.state.gw.writer.flush()
    store = Store(f"sqlite:///{tmp_path / 'agentloop.db'}")
    try:
        return store.list_completions(limit=100)
    finally:
        store.close()


MSG = [{"role": "user", "content": "hello"}]


def test_non_stream_roundtrip_and_log(tmp_path):
    eng = FakeEngine()
    with make_client(tmp_path, eng) as c:
        r = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG, "reasoning_effort": "low"})
        assert r.status_code == 200
        data = r.json()
        assert data["id"].startswith("chatcmpl-")
        msg = data["choices"][0]["message"]
        assert msg["reasoning"] == msg["reasoning_content"] == "think"
        # The engine gets the adapter name, never the alias or the bare base model.
        assert eng.bodies[0]["model"] == "agentloop@v0000"
        assert eng.bodies[0]["chat_template_kwargs"] == {"enable_thinking": True}
        assert "reasoning_effort" not in eng.bodies[0]
        (row,) = rows(tmp_path, c)
    assert row["id"] == data["id"]
    assert row["status_code"] == 200 and row["version"] == "v0000" and row["served_model"] == "agentloop@v0000"
    assert row["prompt_tokens"] == 7 and row["completion_tokens"] == 3
    assert row["request"]["messages"] == MSG
    assert row["response"]["choices"][0]["message"]["content"] == "Hi there"


def test_stream_relay_usage_and_assembly(tmp_path):
    eng = FakeEngine()
    with make_client(tmp_path, eng) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "agentloop", "messages": MSG, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        # Usage was requested upstream for the log but the client did not ask for it.
        assert eng.bodies[0]["stream_options"]["include_usage"] is True
        assert all("usage" not in ch for ch in chunks)
        assert len({ch["id"] for ch in chunks}) == 1
        assert chunks[1]["choices"][0]["delta"]["reasoning_content"] == "think"
        (row,) = rows(tmp_path, c)
        assert row["id"] == chunks[0]["id"] and row["stream"]
        msg = row["response"]["choices"][0]["message"]
        assert msg["content"] == "Hi " and msg["reasoning"] == "think"
        assert msg["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": "{\"a\": 1}"}}]
        assert row["finish_reason"] == "tool_calls" and row["completion_tokens"] == 3

        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "agentloop", "messages": MSG, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
            chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln and ln != "data: [DONE]"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": MSG}).encode(), 400, "model"),
    (json.dumps({"model": "agentloop", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "agentloop", "messages": MSG, "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "agentloop", "messages": MSG, "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"model": "agentloop", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, None),
    (json.dumps({"model": "agentloop", "messages": MSG, "tool_choice": "required"}).encode(), 400, "tool_choice"),
    (json.dumps({"model": "agentloop", "messages": MSG, "chat_template": "{{x}}"}).encode(), 400, "chat_template"),
    (json.dumps({"model": "nope", "messages": MSG}).encode(), 404, "model"),
    (json.dumps({"model": "agentloop@v0042", "messages": MSG}).encode(), 404, "model"),
])
def test_bad_input_is_openai_shaped(tmp_path, body, status, param):
    with make_client(tmp_path, FakeEngine()) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"


def test_engine_down_is_503_with_retry_after(tmp_path):
    with make_client(tmp_path, FakeEngine(up=False)) as c:
        r = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["type"] == "server_error"
    with make_client(tmp_path, FakeEngine(fail=EngineUnreachable("gone"))) as c:
        r = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG, "stream": True})
        assert r.status_code == 503 and "retry-after" in r.headers
        # Failed requests are logged too, with their status.
        assert [x["status_code"] for x in rows(tmp_path, c)][:1] == [503]


def test_engine_client_error_keeps_its_status(tmp_path):
    fail = EngineError.from_response(400, json.dumps({"error": {"message": "prompt too long", "type": "BadRequestError",
                                                                 "param": None, "code": 400}}).encode())
    with make_client(tmp_path, FakeEngine(fail=fail)) as c:
        r = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG})
    assert r.status_code == 400 and r.json()["error"]["message"] == "prompt too long"
    # OpenAI's type for a client error, not vLLM's exception class name.
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("max_tokens,finish", [(3, "length"), (50, "tool_calls"), (None, "tool_calls")])
def test_calls_cut_by_the_cap_finish_with_length(tmp_path, stream, max_tokens, finish):
    """vLLM says "tool_calls" even when the cap cut the turn after a complete
    call; the fake uses 3 completion tokens, so a cap of 3 means cut."""

    class CallingEngine(FakeEngine):
        async def chat(self, body):
            async for chunk in super().chat(body):
                for ch in chunk.get("choices") or []:
                    if "message" in ch:
                        ch["message"].update(content="", tool_calls=[
                            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
                        ch["finish_reason"] = "tool_calls"
                yield chunk

    body = {"model": "agentloop", "messages": MSG, "stream": stream, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    with make_client(tmp_path, CallingEngine()) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            finishes = [ch["finish_reason"] for x in chunks for ch in x["choices"] if ch.get("finish_reason")]
            assert finishes == [finish]
            assert not any(x.get("usage") for x in chunks)  # the client did not ask for usage
        else:
            msg = r.json()["choices"][0]
            assert msg["finish_reason"] == finish
            assert msg["message"]["content"] is None  # OpenAI's null, not vLLM's ""
            assert msg["message"]["tool_calls"][0]["function"]["name"] == "f"
        (row,) = rows(tmp_path, c)
    assert row["finish_reason"] == finish


def test_models_health_metrics(tmp_path):
    with make_client(tmp_path, FakeEngine()) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["agentloop", "agentloop@v0000"]
        assert c.get("/v1/models/agentloop@v0000").json()["version"] == "v0000"
        assert c.get("/v1/models/other").status_code == 404
        assert c.get("/health").json()["ready"] is True
        c.post("/v1/chat/completions", json={"model": "agentloop", "messages": MSG})
        text = c.get("/metrics").text
        assert 'agentloop_requests_total{model="agentloop",status="200",version="v0000"} 1.0' in text
        assert 'agentloop_tokens_total{kind="completion",model="agentloop",version="v0000"} 3.0' in text
        assert c.get("/nope").status_code == 404 and "error" in c.get("/nope").json()


def test_gateway_import_and_health_without_torch_or_vllm(tmp_path):
    code = (
        "import sys; from fastapi.testclient import TestClient\n"
        "from agentloop.serve.http.app import create_app; from agentloop.serve.settings import Settings\n"
        f"app = create_app(Settings(home={str(tmp_path)!r}, engine_urls=['http://127.0.0.1:9']))\n"
        "with TestClient(app) as c:\n"
        "    r = c.get('/health'); assert r.status_code == 200, r.text\n"
        "    assert c.post('/v1/chat/completions', json={'model': 'agentloop', 'messages': [{'role': 'user', 'content': 'x'}]}).status_code == 503\n"
        "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
