"""The retry-wrapped chatbot: answer cleaning and prompt (fast), then retries through a real faulty proxy.

``FaultProxy`` is a real HTTP server on 127.0.0.1 (plain asyncio, its own
thread) between the chatbot and the session gateway: for its first ``fail``
requests it answers 503, closes the connection without a word, cuts a
streamed answer half-way, or streams an empty answer; after that it forwards
byte for byte. Stopping and starting it on the same port is a server restart
as the client sees one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from agentloop.agents.chatbot import (
    AnswerCleaner, Chatbot, ChatbotError, ChatbotUnavailable, EmptyAnswer, Example, clean_answer,
    is_retryable,
)
from tests.conftest import free_port

GREETING = "Hello! How can I help you today?"
JOKE = "Why did the scarecrow win an award? Because he was outstanding in his field."


# ---------------------------------------------------------------- the fault-injecting proxy

class FaultProxy:
    def __init__(self, target: str, *, fail: int = 0, mode: str = "503", port: int | None = None) -> None:
        assert mode in ("503", "close", "cut", "empty")
        self.target, self.fail, self.mode = target.rstrip("/"), fail, mode
        self.port = port or free_port()
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "proxy did not start"
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for w in list(self._writers):  # drop live connections too, as a dying server does
                w.transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = [tuple(x.split(": ", 1)) for x in lines[1:] if ": " in x]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            body = await reader.readexactly(length) if length else b""
            self.requests += 1
            failing = self.requests <= self.fail
            if failing and self.mode == "close":
                writer.transport.abort()  # no status line, no bytes: a crashed server
                return
            if failing and self.mode == "503":
                payload = json.dumps({"error": {"message": "engine restarting", "type": "server_error",
                                                "param": None, "code": "engine_unavailable"}}).encode()
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 0\r\nConnection: close\r\n"
                             + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
                return
            if failing and self.mode == "empty":
                chunk = {"id": "chatcmpl-empty", "object": "chat.completion.chunk", "created": 0, "model": "agentloop",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "  "},
                                      "finish_reason": "stop"}]}
                data = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + data)
                await writer.drain()
                return
            await self._forward(writer, method, path, headers, body, cut=failing and self.mode == "cut")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _forward(self, writer, method, path, headers, body, *, cut: bool) -> None:
        skip = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}
        fwd = {k: v for k, v in headers if k.lower() not in skip}
        async with httpx.AsyncClient(timeout=120) as http:
            async with http.stream(method, self.target + path, headers=fwd, content=body) as r:
                out = [f"HTTP/1.1 {r.status_code} {r.reason_phrase}"]
                out += [f"{k}: {v}" for k, v in r.headers.items()
                        if k.lower() not in ("content-length", "connection", "transfer-encoding")]
                # No length and no chunking: the body ends when we close (valid for a response).
                writer.write(("\r\n".join(out + ["Connection: close", "", ""])).encode("latin-1"))
                async for chunk in r.aiter_raw():
                    if cut:
                        # Half an answer, then a clean close: the stream just stops, with no
                        # error and no finish_reason, as when a server dies mid-answer.
                        writer.write(chunk[:len(chunk) // 2])
                        await writer.drain()
                        return
                    writer.write(chunk)
                    await writer.drain()


@pytest.fixture
def proxy_factory(server):
    made: list[FaultProxy] = []

    def make(**kw) -> FaultProxy:
        p = FaultProxy(server.url, **kw).start()
        made.append(p)
        return p

    yield make
    for p in made:
        if p._thread and p._thread.is_alive():
            p.stop()


def bot_for(url: str, **kw) -> tuple[Chatbot, list]:
    events: list = []
    kw.setdefault("max_tokens", 48)
    b = Chatbot(url, "test-key", policy=None, initial_wait=0.05, max_wait=0.5, **kw)
    return b, events


# ---------------------------------------------------------------- fast: cleaning, prompt, policy

@pytest.mark.parametrize("raw, prompt, clean", [
    ("Assistant: Hello there  ", None, "Hello there"),
    ("  \n Hi!\n\n", None, "Hi!"),
    ("assistant : yes", None, "yes"),
    ("<|im_start|>assistant\nSure.<|im_end|>", None, "Sure."),
    ("Sure.<|im_end|><|im_start|>user\nThanks", None, "Sure."),
    ("What is 2+2?\nAssistant: 4", "What is 2+2?", "4"),
    ("User: What is 2+2?\n4", "What is 2+2?", "4"),
    ("4.\nUser: and 3+3?\nAssistant: 6", None, "4."),
    ("Hello! How can I help you today?", "Hello", "Hello! How can I help you today?"),  # no echo: it answers
    ("Asset prices rose.", None, "Asset prices rose."),
    ("Assistant:", None, ""),
])
def test_clean_answer(raw, prompt, clean):
    assert clean_answer(raw, prompt) == clean
    for step in (1, 2, 5):  # streamed in any pieces, the same text comes out
        c = AnswerCleaner(prompt)
        out = "".join(c.feed(raw[i:i + step]) for i in range(0, len(raw), step)) + c.finish()
        assert out.strip() == clean


def test_stream_cleaner_holds_only_what_it_cannot_decide():
    c = AnswerCleaner()
    assert c.feed("Assis") == ""                # could become "Assistant:"
    assert c.feed("tant: The") == "The"         # prefix gone, text flows
    assert c.feed(" answer ") == " answer"      # trailing space held...
    assert c.feed("is 4.<|im_") == " is 4."     # ...released; a partial marker held
    assert c.feed("end|>") == ""
    assert c.finish() == ""


def test_prompt_has_policy_examples_history_then_the_turn():
    b = Chatbot("http://127.0.0.1:9", policy="Be brief.", examples=[Example("Hi", "Hello."), Example("2+2?", "4")])
    b.history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert b.prompt([{"role": "user", "content": "c"}]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}]
    assert Chatbot("http://127.0.0.1:9", policy=None).prompt() == []


def test_what_is_retried():
    req = httpx.Request("POST", "http://x/v1/chat/completions")

    def status(code: int) -> openai.APIStatusError:
        return openai.APIStatusError("x", response=httpx.Response(code, request=req), body=None)

    assert all(is_retryable(e) for e in (status(503), status(500), status(429), status(408), EmptyAnswer(),
                                         openai.APIConnectionError(request=req), openai.APITimeoutError(req),
                                         httpx.RemoteProtocolError("cut")))
    assert not any(is_retryable(e) for e in (status(400), status(401), status(404), ValueError("x")))


def test_unreachable_server_gives_a_clear_message_quickly():
    b = Chatbot(f"http://127.0.0.1:{free_port()}", attempts=3, initial_wait=0.01, max_wait=0.02)
    t0 = time.monotonic()
    with pytest.raises(ChatbotUnavailable) as e:
        b.ask("Hello")
    assert time.monotonic() - t0 < 5 and e.value.attempts == 3
    assert "did not answer (connection failed" in str(e.value) and "/retry" in str(e.value)
    assert b.history == [] and b.pending == "Hello"


# ---------------------------------------------------------------- against the real gateway

def test_plain_turns_and_history(server):
    b, _ = bot_for(server.url)
    deltas: list = []
    r1 = b.ask("Hello", on_delta=lambda k, t: deltas.append((k, t)))
    assert r1.text == GREETING and r1.attempts == 1 and r1.completion_id.startswith("chatcmpl-")
    assert "".join(t for k, t in deltas if k == "content") == GREETING and len(deltas) > 3  # streamed
    r2 = b.ask("Tell me a joke")
    sent = json.loads(server.wait_row(r2.completion_id)["request"])["messages"]
    assert sent[:2] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": GREETING}]
    assert [m["role"] for m in b.history] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("mode", ["503", "close", "cut", "empty"])
def test_retries_through_a_failing_server(server, proxy_factory, mode):
    proxy = proxy_factory(fail=2, mode=mode)
    b, events = bot_for(proxy.url)
    shown: list[str] = []

    def on_event(kind, info):
        events.append((kind, info))
        shown.clear()  # a retry starts the answer over

    r = b.ask("Hello", on_delta=lambda k, t: shown.append(t), on_event=on_event)
    assert r.text == GREETING and "".join(shown) == GREETING
    assert r.attempts == 3 and proxy.requests == 3
    errors = [info["error"] for kind, info in events if kind == "retry"]
    assert len(errors) == 2
    want = {"503": "HTTP 503", "close": "connection failed", "cut": "cut off", "empty": "empty answer"}
    assert all(want[mode] in e for e in errors), errors
    assert server.wait_row(r.completion_id)["status_code"] == 200


def test_when_retries_run_out_the_user_is_told_and_can_retry(server, proxy_factory):
    proxy = proxy_factory(fail=3, mode="503")
    b, _ = bot_for(proxy.url, attempts=3)
    with pytest.raises(ChatbotUnavailable) as e:
        b.ask("Hello")
    assert e.value.attempts == 3 and proxy.requests == 3
    assert str(e.value).startswith("Sorry, the model server did not answer (HTTP 503) after 3 attempts")
    assert "/retry" in str(e.value)
    assert b.history == [] and b.pending == "Hello"  # the failed turn left no trace but the message
    r = b.retry()  # the server is back (the proxy's failures are spent)
    assert r.text == GREETING and b.pending is None and len(b.history) == 2 and proxy.requests == 4


def test_server_restart_mid_conversation(server, proxy_factory):
    proxy = proxy_factory()
    b, events = bot_for(proxy.url, attempts=50, deadline=30)
    assert b.ask("Hello").text == GREETING
    proxy.stop()
    # Down for 1.5 s, then back on the same address, like a restarted server.
    restart = threading.Timer(1.5, proxy.start)
    restart.start()
    t0 = time.monotonic()
    r = b.ask("Tell me a joke", on_event=lambda k, i: events.append((k, i)))
    restart.join()
    assert time.monotonic() - t0 >= 1.4 and r.attempts >= 2
    assert any(k == "retry" and "connection failed" in i["error"] for k, i in events)
    # The conversation survived: the answered request carried the first exchange.
    sent = json.loads(server.wait_row(r.completion_id)["request"])["messages"]
    assert sent == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": GREETING},
                    {"role": "user", "content": "Tell me a joke"}]
    assert r.text and len(b.history) == 4


def test_errors_that_retrying_cannot_fix_are_not_retried(server, proxy_factory):
    proxy = proxy_factory()
    b = Chatbot(proxy.url, "test-key", model="gpt-4o", policy=None)
    with pytest.raises(ChatbotError) as e:
        b.ask("Hello")
    assert not isinstance(e.value, ChatbotUnavailable) and proxy.requests == 1
    assert "HTTP 404" in str(e.value) and "gpt-4o" in str(e.value)


def test_feedback_on_the_last_turn(server):
    b, _ = bot_for(server.url)
    r = b.ask("Hello")
    (row,) = b.bad("too generic")
    assert (row["type"], row["completion_id"], row["value"], row["comment"]) == ("thumbs", r.completion_id, -1,
                                                                                "too generic")
    (fix,) = b.fix("Hi! What can I do for you?")
    assert fix["correction"] == {"role": "assistant", "content": "Hi! What can I do for you?"}
    assert b.history[-1] == {"role": "assistant", "content": "Hi! What can I do for you?"}
    with server.db() as con:
        got = con.execute("SELECT type, value FROM feedback WHERE completion_id = ? ORDER BY created_at",
                          (r.completion_id,)).fetchall()
    assert got == [("thumbs", -1), ("correction", None)]
