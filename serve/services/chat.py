"""The chat-completion path as a service: resolve the version, prepare the engine body,
call the engine pool, fix the answer, log it.

The HTTP route (serve/http/app.py) parses the body, says who is calling and what
their max_tokens ceiling is, and turns the `ChatResult` into a response; a test
can call `ChatService.create` directly with a fake engine pool (tests/test_chat_service.py).

Invariants:
- every request that reaches `create` is logged exactly once, off the response
  path (the LogWriter), whether it succeeds, fails, is cancelled or the client
  goes away mid-stream; the row records the one version it ran on;
- a version's in-flight count (`ServedVersions.acquire`/`release`) covers the
  whole request, stream included, so a replaced version drains before unloading;
- an error before the first byte raises an AgentloopError (the edge answers it);
  after it, the stream carries it in OpenAI's shape, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from agentloop.rl.schema import conversation_hash
from agentloop.serve import protocol
from agentloop.serve.engine.client import EnginePool
from agentloop.serve.engine.router import ServedVersions, Version
from agentloop.serve.errors import AgentloopError, EngineUnavailable, InvalidRequest
from agentloop.serve.metrics import Metrics
from agentloop.serve.store.logwriter import LogWriter

log = logging.getLogger("agentloop.chat")


def _dumps(obj: Any) -> str:
    # Once per streamed chunk: orjson is several times cheaper than json.dumps.
    return orjson.dumps(obj).decode()


def apply_token_ceiling(req: protocol.ChatRequest, engine_body: dict[str, Any], ceiling: int | None,
                        max_model_len: int | None) -> None:
    """Refuse a max_tokens / max_completion_tokens above the caller's ceiling (400
    naming the parameter); cap a request that sets neither at the ceiling.

    Capping rather than refusing the unset case keeps every OpenAI client
    working (most send no max_tokens). The cap is only sent when it is below
    the engine's context length: vLLM refuses a max_tokens above its
    max_model_len, and below it takes the smaller of max_tokens and what the
    prompt left, so the cap never turns a fitting prompt into an error; at or
    above it, the context already bounds the answer more tightly. With no
    ceiling (None) the context is the only bound, and the engine applies it
    (vLLM 0.32: a 400 in its words for a max_tokens above the context or a
    prompt that fills it, else max_tokens clipped to what the prompt left;
    docs/reliability.md). An unknown context (no
    engine has answered yet) sends the cap: the request cannot run anyway."""
    if ceiling is None:
        return
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > ceiling:
            raise InvalidRequest(f"'{name}' is {value}, above this key's limit of {ceiling} tokens.",
                                 param=name, code="max_tokens_above_limit")
    if req.max_tokens is None and req.max_completion_tokens is None and (
            max_model_len is None or ceiling < max_model_len):
        engine_body["max_tokens"] = ceiling
        req.max_tokens = ceiling  # so a turn cut at the ceiling is reported as "length"


@dataclass
class ChatResult:
    """A started completion: the whole response, or the SSE events of a stream."""

    id: str
    response: dict[str, Any] | None = None
    events: AsyncIterator[str] | None = None


class ChatService:
    def __init__(self, router: ServedVersions, pool: EnginePool, writer: LogWriter, metrics: Metrics, *,
                 thinking: protocol.ThinkingBudgets | None = None, spawn: Callable[[Any], None] | None = None,
                 tool_outcomes: Callable[[str, dict[str, Any]], Any] | None = None):
        self.router = router
        # Given a request that brings tool results back, grades the calls that made them
        # (serve/services/grading.py); blocking, so it runs in a thread, off the response path.
        self.tool_outcomes = tool_outcomes
        self.thinking = thinking or protocol.ThinkingBudgets()
        self.pool = pool
        self.writer = writer
        self.metrics = metrics
        self._spawn = spawn or self._own_spawn
        self._tasks: set[asyncio.Task] = set()

    def _own_spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resolve(self, name: str) -> Version:
        if not self.router.versions:
            raise EngineUnavailable("The model is still being prepared; retry shortly.", retry_after=10)
        return self.router.resolve(name)

    def record(self, row: dict[str, Any]) -> None:
        if not self.writer.submit(row):
            self._spawn(self.writer.asubmit(row))  # queue full: back-pressure off the response path

    async def create(self, body: dict[str, Any], *, caller: str, max_tokens_ceiling: int | None,
                     started: float | None = None) -> ChatResult:
        """Run one chat completion for `caller` on a parsed request body (protocol.parse_body)."""
        t0 = time.perf_counter() if started is None else started
        row: dict[str, Any] = {
            "created_at": time.time(), "caller": caller, "model": str(body.get("model", ""))[:200],
            "stream": body.get("stream") is True, "request": body, "conversation_hash": conversation_hash(body),
            "served_model": None, "version": None, "response": None, "error": None, "ttft_ms": None,
            "prompt_tokens": None, "completion_tokens": None, "finish_reason": None,
        }
        rid, cid = protocol.new_completion_id()
        row["id"] = cid

        def finish(status: int, response: dict | None, error: str | None, ttft: float | None) -> None:
            latency = time.perf_counter() - t0
            usage = (response or {}).get("usage") or {}
            row.update(status_code=status, response=response, error=error, latency_ms=latency * 1000,
                       ttft_ms=ttft * 1000 if ttft is not None else None,
                       prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
                       finish_reason=protocol.finish_reason(response))
            self.record(row)
            if row["version"]:
                self.metrics.observe(model=row["model"], version=row["version"], status=status, latency=latency,
                                     ttft=ttft, usage=usage)

        version: Version | None = None
        try:
            req = protocol.validate(body)
            last = (body.get("messages") or [None])[-1]
            if self.tool_outcomes is not None and isinstance(last, dict) and last.get("role") == "tool":
                self._spawn(asyncio.to_thread(self.tool_outcomes, caller, body))
            version = self.resolve(req.model)
            self.router.acquire(version)
            row.update(served_model=version.name, version=version.version)
            ebody = protocol.prepare(body, req, version.name, self.thinking)
            apply_token_ceiling(req, ebody, max_tokens_ceiling, self.pool.max_model_len)
            ebody["_request_id"] = rid
            agen = self.pool.chat(ebody)
            self.metrics.inflight.inc()
            try:
                first = await agen.__anext__()
            except BaseException:
                self.metrics.inflight.dec()
                raise
        except AgentloopError as e:
            if version is not None:
                self.router.release(version)
            finish(e.status, None, e.message, None)
            raise
        except Exception as e:
            # A bug, not the client's doing: still logged (as the edge's 500 answers).
            if version is not None:
                self.router.release(version)
            finish(500, None, f"internal error: {type(e).__name__}", None)
            raise

        if not req.stream:
            try:
                resp = protocol.fix_response(first, cid, req)
            finally:
                await agen.aclose()
                self.metrics.inflight.dec()
                self.router.release(version)
            finish(200, resp, None, None)
            return ChatResult(id=cid, response=resp)
        return ChatResult(id=cid, events=self._relay(req, cid, version, agen, first, t0, finish))

    async def generate(self, body: dict[str, Any], *, model: str) -> dict[str, Any]:
        """An unlogged, non-streamed completion of `body` by `model` (a served name such as
        'agentloop@v0003'): the learning loop's samples. The same validation, engine body and
        answer fixing as `create`, so a sample is what a user would have been served; not logged
        (a sample is training material, not a user's exchange) and not in the user metrics; the
        version's in-flight count covers it, so a version being replaced drains it too."""
        body = {**body, "model": model, "stream": False}
        body.pop("stream_options", None)
        req = protocol.validate(body)
        version = self.resolve(model)
        self.router.acquire(version)
        try:
            ebody = protocol.prepare(body, req, version.name, self.thinking)
            ebody["_request_id"] = protocol.new_completion_id()[0]
            agen = self.pool.chat(ebody)
            try:
                first = await agen.__anext__()
            finally:
                await agen.aclose()
            return protocol.fix_response(first, protocol.new_completion_id()[1], req)
        finally:
            self.router.release(version)

    async def _relay(self, req: protocol.ChatRequest, cid: str, version: Version, agen, first, t0: float,
                     finish) -> AsyncIterator[str]:
        wants_usage = bool((req.stream_options or {}).get("include_usage"))
        asm = protocol.StreamAssembler()
        fixer = protocol.FinishFixer(req)
        status, error, ttft = 200, None, time.perf_counter() - t0
        item = first
        try:
            while True:
                # An engine yields a chunk or a list of chunks that arrived
                # together; a list goes out in one write.
                out = []
                for chunk in item if isinstance(item, list) else (item,):
                    if "error" in chunk and not chunk.get("choices"):
                        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                        code = err.get("code")
                        # vLLM puts the HTTP status it would have used in `code`.
                        status = code if isinstance(code, int) and 400 <= code < 600 else 500
                        error = err.get("message")
                        out.append(f"data: {_dumps(chunk)}\n\n")
                        continue
                    for c in fixer.feed(chunk):
                        asm.add(c)
                        if (fixed := protocol.fix_chunk(c, cid, wants_usage)) is not None:
                            out.append(f"data: {_dumps(fixed)}\n\n")
                if out:
                    yield "".join(out)
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    break
            for c in fixer.flush():
                asm.add(c)
                if (fixed := protocol.fix_chunk(c, cid, wants_usage)) is not None:
                    yield f"data: {_dumps(fixed)}\n\n"
            yield "data: [DONE]\n\n"
        except AgentloopError as e:
            # Headers are gone: the error travels in the stream, as OpenAI does.
            status, error = e.status, e.message
            yield f"data: {_dumps(e.to_openai())}\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status, error = 499, "client closed the connection"
            raise
        finally:
            self.metrics.inflight.dec()
            self.router.release(version)
            await agen.aclose()
            result = asm.result()
            result["id"] = cid
            finish(status, result, error, ttft)
