"""The FastAPI gateway: OpenAI-compatible routes in front of the engine pool.

This module only converts between HTTP and the engine interface; request
meaning lives in serve/chat.py, routing in serve/models.py, engines in
serve/engine.py, persistence in serve/store.py, who may call /v1 and how much
in serve/access.py (a middleware in front of every /v1 route).

Invariants:
- importing this module (and answering /health) never imports torch or vllm;
- every error a client can cause is a 4xx in OpenAI's shape, engine trouble is
  a 503 with Retry-After, and nothing a client sends produces a 500;
- every chat completion that passed JSON parsing is logged exactly once, off
  the response path (LogWriter), including failed and cancelled ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentloop.serve.http import access
from agentloop.serve.http import admin
from agentloop.serve.http import api_schema
from agentloop.serve import protocol as chat
from agentloop.serve.services import feedback
from agentloop.serve.http import ui
from agentloop.serve.http.auth import caller_of
from agentloop.serve.engine.client import Engine, EnginePool
from agentloop.serve.errors import AgentloopError, EngineUnavailable, InvalidRequest
from agentloop.serve.metrics import Metrics
from agentloop.serve.engine.router import ModelRouter
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import LogWriter, Store

log = logging.getLogger("agentloop.gateway")


def _dumps(obj: Any) -> str:
    # Once per streamed chunk: orjson is several times cheaper than json.dumps.
    return orjson.dumps(obj).decode()


class Gateway:
    """Everything one app instance owns; built in the lifespan, torn down there."""

    def __init__(self, settings: Settings, engines: list[Engine] | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.router = ModelRouter(settings.alias)
        self.store: Store | None = None
        self.writer: LogWriter | None = None
        self.pool: EnginePool | None = None
        self._injected = engines
        self.boot = None  # serve.boot.Boot when the gateway starts engines itself
        self.adapters = None  # serve.adapters.AdapterManager once the base model is known
        self.base_model: str | None = None
        self.loop = None  # serve.loop.LoopRunner
        self.access: access.Access | None = None  # keys, open mode, per-key limits
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self.store = Store(self.settings.db_url)
        gate = access.Access(self.settings, self.store)
        try:
            await asyncio.to_thread(gate.start)  # refuses a public address without keys (StartupRefused)
        except BaseException:
            self.store.close()
            raise
        self.access = gate
        self.spawn(gate.run())  # re-reads the keys every keys_refresh_seconds
        self.writer = LogWriter(self.store, maxsize=self.settings.log_queue_size)
        from agentloop.serve.services.loop import LoopRunner  # rl.loop: stdlib + registry, no torch

        self.loop = LoopRunner(self)
        await asyncio.to_thread(self.loop.recover)
        if self._injected is not None:
            self.pool = EnginePool(self._injected)
        else:
            from agentloop.serve.engine.boot import Boot  # only the serving path needs process management

            self.boot = Boot(self)
            self.pool = EnginePool(self.boot.engines())
        await self.pool.start()
        if self.boot is not None:
            self.spawn(self.boot.run())
        if self.settings.loop_enabled:
            self.loop.start_scheduler()

    async def stop(self) -> None:
        if self.loop is not None:
            await self.loop.stop()
        if self.boot is not None:
            await self.boot.stop()
        if self.pool is not None:
            await self.pool.aclose()
        for t in list(self._tasks):
            t.cancel()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        if self.store is not None:
            self.store.close()

    def resolve(self, name: str):
        if not self.router.versions:
            raise EngineUnavailable("The model is still being prepared; retry shortly.", retry_after=10)
        return self.router.resolve(name)

    def record(self, row: dict[str, Any]) -> None:
        assert self.writer is not None
        if not self.writer.submit(row):
            self.spawn(self.writer.asubmit(row))  # queue full: back-pressure off the response path


def create_app(settings: Settings | None = None, *, engines: list[Engine] | None = None) -> FastAPI:
    settings = settings or Settings()
    gw = Gateway(settings, engines)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="agentloop", version="0.1.0", lifespan=lifespan)
    api_schema.install(app)  # document the bodies the routes read by hand
    app.state.gw = gw
    app.add_middleware(access.AccessMiddleware, gw=gw)  # /v1: keys, rate, streams, body size
    app.include_router(admin.router)
    app.include_router(feedback.router)
    app.include_router(ui.router)

    @app.exception_handler(AgentloopError)
    async def _domain_error(_: Request, exc: AgentloopError):
        return JSONResponse(exc.to_openai(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return JSONResponse(InvalidRequest(f"Invalid value for '{loc}': {err['msg']}.", param=loc or None).to_openai(),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        etype = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = {"error": {"message": str(exc.detail), "type": etype, "param": None, "code": code}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        body = {"error": {"message": "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        engines = [{"url": e.url, "ready": e.ready, "error": getattr(e, "last_error", None)}
                   for e in (gw.pool.engines if gw.pool else [])]
        ready = bool(gw.pool and gw.pool.ready and gw.router.versions)
        return {"status": "ok" if ready else "starting", "ready": ready, "engines": engines,
                "live": gw.router.live, "boot": gw.boot.state if gw.boot else None}

    @app.get("/metrics")
    async def metrics():
        gw.metrics.engines_ready.set(sum(e.ready for e in gw.pool.engines) if gw.pool else 0)
        gw.metrics.log_pending.set(gw.writer.pending if gw.writer else 0)
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": gw.router.list_models()}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        for m in gw.router.list_models():
            if m["id"] == model:
                return m
        gw.router.resolve(model)  # raises the OpenAI-shaped 404
        return None  # pragma: no cover

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body = chat.parse_body(await request.body())
        caller = caller_of(request)
        row: dict[str, Any] = {
            "created_at": time.time(), "caller": caller, "model": str(body.get("model", ""))[:200],
            "stream": body.get("stream") is True, "request": body, "conversation_hash": chat.conversation_hash(body),
            "served_model": None, "version": None, "response": None, "error": None, "ttft_ms": None,
            "prompt_tokens": None, "completion_tokens": None, "finish_reason": None,
        }
        rid, cid = chat.new_completion_id()
        row["id"] = cid

        def finish(status: int, response: dict | None, error: str | None, ttft: float | None) -> None:
            latency = time.perf_counter() - t0
            usage = (response or {}).get("usage") or {}
            row.update(status_code=status, response=response, error=error, latency_ms=latency * 1000,
                       ttft_ms=ttft * 1000 if ttft is not None else None,
                       prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
                       finish_reason=chat.finish_reason(response))
            gw.record(row)
            if row["version"]:
                gw.metrics.observe(model=row["model"], version=row["version"], status=status, latency=latency,
                                   ttft=ttft, usage=usage)

        try:
            req = chat.validate(body)
            version = gw.resolve(req.model)
            gw.router.acquire(version)
            row.update(served_model=version.name, version=version.version)
            ebody = chat.prepare(body, req, version.name)
            access.apply_token_ceiling(request, req, ebody)  # 400 above the key's ceiling, else capped
            ebody["_request_id"] = rid
            agen = gw.pool.chat(ebody)
            gw.metrics.inflight.inc()
            try:
                first = await agen.__anext__()
            except BaseException:
                gw.metrics.inflight.dec()
                raise
        except AgentloopError as e:
            if row["version"]:
                gw.router.release(version)
            finish(e.status, None, e.message, None)
            raise
        except Exception as e:
            # A bug, not the client's doing: still logged (as the 500 `_unexpected` answers).
            if row["version"]:
                gw.router.release(version)
            finish(500, None, f"internal error: {type(e).__name__}", None)
            raise

        if not req.stream:
            try:
                resp = chat.fix_response(first, cid, req)
            finally:
                await agen.aclose()
                gw.metrics.inflight.dec()
                gw.router.release(version)
            finish(200, resp, None, None)
            return JSONResponse(resp)

        wants_usage = bool((req.stream_options or {}).get("include_usage"))

        async def relay():
            asm = chat.StreamAssembler()
            fixer = chat.FinishFixer(req)
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
                            if (fixed := chat.fix_chunk(c, cid, wants_usage)) is not None:
                                out.append(f"data: {_dumps(fixed)}\n\n")
                    if out:
                        yield "".join(out)
                    try:
                        item = await agen.__anext__()
                    except StopAsyncIteration:
                        break
                for c in fixer.flush():
                    asm.add(c)
                    if (fixed := chat.fix_chunk(c, cid, wants_usage)) is not None:
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
                gw.metrics.inflight.dec()
                gw.router.release(version)
                await agen.aclose()
                result = asm.result()
                result["id"] = cid
                finish(status, result, error, ttft)

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
