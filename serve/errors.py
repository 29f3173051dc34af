"""Domain errors of agentloop, and their one translation to OpenAI's error shape.

Invariant: code below the HTTP edge raises these (never HTTPException); the
edge (serve/http/app.py, serve/cli/main.py) is the only place that turns them into a
status code and `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any


class AgentloopError(Exception):
    """Base class. `status` and `type` follow OpenAI's conventions."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(AgentloopError):
    """The client sent something we cannot serve (bad JSON, bad field)."""

    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(AgentloopError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(AgentloopError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(AgentloopError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class EngineUnavailable(AgentloopError):
    """No engine can take the request right now; the client should retry."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"

    def __init__(self, message: str = "The model engine is not available; retry shortly.", *, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class EngineUnreachable(EngineUnavailable):
    """The request never reached the engine (connection refused or timed out),
    so it is safe to send it to another engine."""


class StoreUnavailable(AgentloopError):
    """The database cannot be reached (down, restarting, unreachable within its connect
    timeout, or every pooled connection busy past the pool's timeout); the client should
    retry. Raised by the store for connection failures only, never for a bad statement."""

    status = 503
    type = "server_error"
    code = "database_unavailable"

    def __init__(self, message: str = "The database is not available; retry shortly.", *, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RegistryUnavailable(StoreUnavailable):
    """The deployment's adapter registry (its `registry_url`) cannot be reached; retry shortly."""

    code = "registry_unavailable"

    def __init__(self, message: str = "The adapter registry is not available; retry shortly.", *,
                 retry_after: int = 5):
        super().__init__(message, retry_after=retry_after)


class EngineError(AgentloopError):
    """The engine answered with an error of its own; keep its status and body.

    vLLM already answers in OpenAI's shape; we pass its message through but
    never let an engine-side 5xx look like the client's fault or vice versa.
    """

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def from_response(cls, status: int, body: bytes) -> "EngineError":
        import json

        message, etype, param, code = body.decode("utf-8", "replace")[:2000], None, None, None
        try:
            data = json.loads(body)
            err = data.get("error", data) if isinstance(data, dict) else {}
            if isinstance(err, dict):
                message = str(err.get("message") or message)
                etype, param = err.get("type"), err.get("param")
                code = err.get("code")
        except ValueError:
            pass
        # vLLM reports some client mistakes (e.g. a too-long prompt) as 400 with
        # code 400; OpenAI's codes are strings or null.
        if code is not None and not isinstance(code, str):
            code = None
        # vLLM labels some client errors "BadRequestError" (the exception's
        # class name); OpenAI's type for every 4xx of this kind is this one.
        if status < 500:
            etype = "invalid_request_error"
        if status == 404 and message.startswith("The model"):
            code = code or "model_not_found"
        return cls(status, message, type=etype, param=param, code=code)


class RequestTooLarge(AgentloopError):
    """The request body is over the caller's (or the route's) size limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(AgentloopError):
    """Too many requests per minute, or too many at once, for this key: retry later.

    Shaped as OpenAI's 429 for a request-rate limit: type "requests", code
    "rate_limit_exceeded" (its SDKs raise RateLimitError and honour Retry-After)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, limit: int | None = None, remaining: int | None = None):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
        self.limit = limit
        self.remaining = remaining

    def headers(self) -> dict[str, str]:
        out = {"Retry-After": str(self.retry_after)}
        if self.limit is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit)
            out["x-ratelimit-remaining-requests"] = str(self.remaining or 0)
            out["x-ratelimit-reset-requests"] = f"{self.retry_after}s"
        return out
