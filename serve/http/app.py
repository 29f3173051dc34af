"""The FastAPI app: OpenAI-compatible routes in front of the gateway's parts.

`create_app` wraps the parts that serve/compose.py builds (`Gateway`) in an
app: its lifespan starts and stops them, routes parse, call one service and
convert. What a chat request means is serve/protocol.py, the completion path
serve/services/chat.py, who may call /v1 and how much serve/http/access.py
(a middleware in front of every /v1 route).

Invariants:
- importing this module (and answering /health) never imports torch or vllm;
- every error a client can cause is a 4xx in OpenAI's shape, engine trouble is
  a 503 with Retry-After, and nothing a client sends produces a 500: domain
  errors (serve/errors.py) become responses here, in the exception handlers;
- every chat completion that passed JSON parsing is logged exactly once, off
  the response path (ChatService), including failed and cancelled ones.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentloop.serve import protocol
from agentloop.serve.compose import Gateway
from agentloop.serve.engine.client import Engine
from agentloop.serve.errors import AgentloopError, EngineUnavailable, InvalidRequest
from agentloop.serve.http import admin, api_schema, feedback, ui
from agentloop.serve.http.access import AccessMiddleware, token_ceiling
from agentloop.serve.http.auth import caller_of
from agentloop.serve.settings import Settings

log = logging.getLogger("agentloop.gateway")


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
    app.add_middleware(AccessMiddleware, access=lambda: gw.access)  # /v1: keys, rate, streams, body size
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
        return gw.health()

    @app.get("/metrics")
    async def metrics():
        gw.metrics.engines_ready.set(sum(e.ready for e in gw.pool.engines) if gw.pool else 0)
        gw.metrics.log_pending.set(gw.writer.pending if gw.writer else 0)
        gw.metrics.log_dead_letters.set(gw.writer.dead_letters if gw.writer else 0)
        gw.metrics.log_dropped.set(gw.writer.dropped if gw.writer else 0)
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
        body = protocol.parse_body(await request.body())
        if gw.chat is None:  # only before the lifespan started
            raise EngineUnavailable("The gateway is starting; retry shortly.")
        result = await gw.chat.create(body, caller=caller_of(request), started=t0,
                                      max_tokens_ceiling=token_ceiling(request, settings.limit_max_tokens))
        if result.events is None:
            return JSONResponse(result.response)
        return StreamingResponse(result.events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
