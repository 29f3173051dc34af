"""Per-key limits (serve/services/access.py): requests per minute, chat completions in flight,
request body size and the max_tokens ceiling — against the real app with a fake
engine, in process. Every refusal must be OpenAI-shaped, never a 5xx, and a
refused body must never reach the engine or be read whole.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi.testclient import TestClient

from agentloop.serve.services.access import Limiter
from tests.test_gateway_unit import FakeEngine
from tests.test_keys import CHAT, add_key, assert_error, bearer, make_app, wait_for


def test_requests_per_minute_get_429_with_retry_after(tmp_path):
    _, slow = add_key(tmp_path, "slow", rpm=5)
    _, other = add_key(tmp_path, "other")
    with TestClient(make_app(tmp_path)) as c:
        now = [1000.0]
        c.app.state.gw.access.limiter.clock = lambda: now[0]  # refill by the test's clock, not by sleeping
        statuses = []
        for _ in range(8):
            r = c.post("/v1/chat/completions", json=CHAT, headers=bearer(slow))
            statuses.append(r.status_code)
        assert statuses == [200] * 5 + [429] * 3  # a burst of rpm, then refused
        err = assert_error(r, 429, "rate_limit_exceeded", etype="requests")
        assert "5 requests per minute" in err["message"]
        assert int(r.headers["retry-after"]) == 12  # one request's worth of refill at 5/min
        assert r.headers["x-ratelimit-limit-requests"] == "5" and r.headers["x-ratelimit-remaining-requests"] == "0"
        # Every /v1 route counts; other keys have their own bucket.
        assert c.get("/v1/models", headers=bearer(slow)).status_code == 429
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(other)).status_code == 200
        now[0] += 12.0
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(slow)).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(slow)).status_code == 429
        # Refused requests never reached the engine.
        assert len(c.app.state.gw.pool.engines[0].bodies) == 7


def test_open_mode_limits_apply_per_caller(tmp_path):
    with TestClient(make_app(tmp_path, limit_rpm=3)) as c:
        assert [c.get("/v1/models", headers=bearer("a")).status_code for _ in range(4)] == [200, 200, 200, 429]
        assert c.get("/v1/models", headers=bearer("b")).status_code == 200
        assert [c.get("/v1/models").status_code for _ in range(4)][-1] == 429  # no bearer: one shared caller


class GatedEngine(FakeEngine):
    """Holds every request before its first chunk until `release` is set."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.waiting = 0

    async def chat(self, body):
        self.waiting += 1
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.waiting -= 1
        async for chunk in super().chat(body):
            yield chunk


def test_concurrent_streams_get_429_and_free_their_slot(tmp_path):
    _, raw = add_key(tmp_path, "two-at-a-time", max_streams=2)
    eng = GatedEngine()
    with TestClient(make_app(tmp_path, eng)) as c:
        results: list[int] = []

        def stream():
            with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(raw)) as r:
                results.append((r.status_code, sum(1 for _ in r.iter_lines())))

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: eng.waiting == 2)
        refused = [c.post("/v1/chat/completions", json=CHAT, headers=bearer(raw)) for _ in range(3)]
        refused.append(c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(raw)))
        for r in refused:
            err = assert_error(r, 429, "rate_limit_exceeded", etype="requests")
            assert r.headers["retry-after"] == "1" and "2 chat completions in flight" in err["message"]
        # Another key, and the key's other routes, are not held up by its streams.
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("x" * 20)).status_code == 401
        assert c.get("/v1/models", headers=bearer(raw)).status_code == 200
        eng.release.set()
        for t in threads:
            t.join(30)
        assert [s for s, _ in results] == [200, 200] and all(n > 3 for _, n in results)
        assert c.app.state.gw.access.limiter.inflight == {}  # slots freed when the streams ended
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(raw)).status_code == 200


def test_body_over_the_limit_is_413_before_and_while_reading(tmp_path):
    _, raw = add_key(tmp_path, "small", max_body_bytes=2048)
    eng = FakeEngine()
    with TestClient(make_app(tmp_path, eng)) as c:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}
        r = c.post("/v1/chat/completions", json=big, headers=bearer(raw))  # Content-Length: 4000+
        err = assert_error(r, 413, "request_too_large")
        assert "2048 bytes" in err["message"]
        # No Content-Length (chunked): counted as it arrives, refused past the limit.
        data = json.dumps(big).encode()

        def chunks():
            for i in range(0, len(data), 512):
                yield data[i:i + 512]

        json_type = {**bearer(raw), "content-type": "application/json"}
        r = c.post("/v1/chat/completions", content=chunks(), headers=json_type)
        assert_error(r, 413, "request_too_large")
        r = c.post("/v1/feedback", content=chunks(), headers=bearer(raw))
        assert_error(r, 413, "request_too_large")
        assert eng.bodies == []  # nothing too large reached the engine
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(raw)).status_code == 200
    with TestClient(make_app(tmp_path, limit_body_bytes=4096)) as c:  # the default applies to other keys
        _, other = add_key(tmp_path, "default-limits")
        wait_for(lambda: c.get("/v1/models", headers=bearer(other)).status_code == 200)
        assert c.post("/v1/chat/completions", json=big, headers=bearer(other)).status_code == 200  # ~4 KB < 4096
        huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_error(c.post("/v1/chat/completions", json=huge, headers=bearer(other)), 413, "request_too_large")


def test_max_tokens_above_the_ceiling_is_400_and_unset_is_capped(tmp_path):
    _, raw = add_key(tmp_path, "short-answers", max_tokens=64)
    eng = FakeEngine()
    with TestClient(make_app(tmp_path, eng)) as c:
        for param in ("max_tokens", "max_completion_tokens"):
            r = c.post("/v1/chat/completions", json={**CHAT, param: 65}, headers=bearer(raw))
            err = assert_error(r, 400, "max_tokens_above_limit")
            assert err["param"] == param and "64" in err["message"]
        assert eng.bodies == []
        assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 64}, headers=bearer(raw)).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(raw)).status_code == 200
        assert [b.get("max_tokens") for b in eng.bodies] == [64, 64]  # the unset one capped at the ceiling
        # Keys without an override get AGENTLOOP_LIMIT_MAX_TOKENS, by default none: the context
        # (the engine's) is the only bound, and the engine says when a request is over it.
        _, other = add_key(tmp_path, "defaults")
        wait_for(lambda: c.get("/v1/models", headers=bearer(other)).status_code == 200)
        assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4096}, headers=bearer(other)).status_code == 200
        assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4097}, headers=bearer(other)).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer(other)).status_code == 200
        assert [b.get("max_tokens") for b in eng.bodies[2:]] == [4096, 4097, None]
        c.app.state.gw.writer.flush()
        rows = c.app.state.gw.store.list_completions(limit=10)
    # The log keeps the request as the client sent it (no injected max_tokens), with its status.
    assert sorted(r["status_code"] for r in rows) == [200, 200, 200, 200, 200, 400, 400]
    sent = sorted(r["request"].get("max_tokens") or r["request"].get("max_completion_tokens") or 0 for r in rows)
    assert sent == [0, 0, 64, 65, 65, 4096, 4097]


def test_a_gateway_ceiling_caps_unset_requests_below_the_context(tmp_path):
    """AGENTLOOP_LIMIT_MAX_TOKENS set: a ceiling for keys without their own, sent only below the
    engine's context (2048 on the fake engine, as vLLM's /v1/models reports it)."""
    for ceiling, sent in ((1000, 1000), (4096, None)):
        eng = FakeEngine()
        with TestClient(make_app(tmp_path / str(ceiling), eng, limit_max_tokens=ceiling)) as c:
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert_error(c.post("/v1/chat/completions", json={**CHAT, "max_tokens": ceiling + 1}), 400,
                         "max_tokens_above_limit")
        assert [b.get("max_tokens") for b in eng.bodies] == [sent]


def test_a_flood_gets_429s_never_5xx(tmp_path):
    """The numbers docs/reliability.md quotes: one key floods the gateway."""
    _, raw = add_key(tmp_path, "flood", rpm=60, max_streams=4)
    eng = GatedEngine()
    eng.release.set()
    with TestClient(make_app(tmp_path, eng)) as c:
        codes: dict[int, int] = {}
        t0 = time.monotonic()
        for i in range(300):
            r = c.post("/v1/chat/completions", json=CHAT, headers=bearer(raw)) if i % 2 else \
                c.get("/v1/models", headers=bearer(raw))
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
        elapsed = time.monotonic() - t0
    print(f"\n[limits] 300 requests in {elapsed:.1f} s from one key at rpm=60: {codes}")
    assert set(codes) <= {200, 429} and codes[429] >= 300 - 60 - int(elapsed) - 1


def test_limiter_memory_is_bounded():
    lim = Limiter(max_tracked=100)
    for i in range(10_000):
        lim.take(f"caller-{i}", 10)
    assert len(lim._buckets) == 100
    for i in range(5):
        lim.enter("a", 5)
    for i in range(5):
        lim.leave("a")
    assert lim.inflight == {}
