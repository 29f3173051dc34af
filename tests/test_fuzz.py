"""Schemathesis fuzzing of the gateway's OpenAPI: no 5xx, and every error in OpenAI's shape.

Owns the generated-input half of "bad input" (the hand-made half is
tests/test_hostile.py). Two runs, both deterministic (fixed seed, fixed
example counts, no example database) so a failure reproduces exactly:

- in-process: the real app (serve.app.create_app) over ASGI with the
  FakeEngine of tests/test_gateway_unit.py and a real adapter registry, every
  operation of /openapi.json, positive and negative data, schemathesis'
  coverage and fuzzing phases. Fast, so it runs many cases.
- against the session server (real gateway, real vLLM, tiny model): the
  /v1 operations and /health, a bounded number of cases, generations capped
  at a few tokens.

The property checked for every response (`check_outcome`): status < 500, and
an error status carries `{"error": {"message", "type", "param", "code"}}` --
except on the HTML pages (`/`, `/admin`, the `/admin/login` form), which
answer people with a page.
The request counts are written to artifacts/fuzz-counts.json for
docs/reliability.md.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis

from agentloop.serve.http.app import create_app
from agentloop.serve.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.test_gateway_unit import FakeEngine

SEED = 20260601
ROOT = Path(__file__).resolve().parents[1]
COUNTS_FILE = ROOT / "artifacts" / "fuzz-counts.json"
# Pages for people answer in HTML, errors included (a wrong key on the login
# form gets the form again, with a 401); the JSON API answers in OpenAI's shape.
HTML_PAGES = {"/", "/admin", "/admin/login"}
# Generated outputs on the real engine stay this short: the fuzz is about the
# request, not the text, and 2 CPU cores are shared with the rest of the suite.
REAL_MAX_TOKENS = 4
REAL_MAX_N = 2

COUNTS: dict[str, Counter] = {"in_process": Counter(), "real_server": Counter()}
# The document the gateway serves at /openapi.json (building the app touches
# nothing: files and engines come with its lifespan, which this never starts).
OPENAPI = create_app(Settings(home=ROOT / "artifacts" / "unused-home")).openapi()


def _config(max_examples: int, *, coverage: bool) -> "schemathesis.Config":
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": max_examples, "database": "none"},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": coverage},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    })


def check_outcome(case, response) -> None:
    """No 5xx; an error is OpenAI-shaped (pages for people excepted)."""
    label = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (label, response.status_code, response.text[:500], case.body)
    if response.status_code < 400:
        return
    if case.path in HTML_PAGES and response.headers.get("content-type", [""])[0].startswith("text/html"):
        return
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{label}: {response.status_code} is not an OpenAI error: {response.text[:300]}")
    assert set(err) == {"message", "type", "param", "code"}, (label, err)
    assert isinstance(err["message"], str) and err["message"], (label, err)
    assert err["type"] in ("invalid_request_error", "server_error"), (label, err)


def _record(run: str, case, response) -> None:
    counts = COUNTS[run]
    counts["requests"] += 1
    counts[f"{case.method} {case.path}"] += 1
    counts[f"{case.method} {case.path} -> {response.status_code}"] += 1
    counts[f"status {response.status_code}"] += 1


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    COUNTS_FILE.parent.mkdir(exist_ok=True)
    old = json.loads(COUNTS_FILE.read_text()) if COUNTS_FILE.exists() else {}
    old.update({run: dict(sorted(c.items())) for run, c in COUNTS.items() if c})
    old["seed"] = SEED
    COUNTS_FILE.write_text(json.dumps(old, indent=2) + "\n")


def test_openapi_describes_the_bodies_the_routes_read():
    """What the fuzz generates from: the documented bodies accept real requests and refuse broken ones."""
    import jsonschema

    from agentloop.serve.http import api_schema

    for path, method in api_schema.BODIES:
        assert "requestBody" in OPENAPI["paths"][path][method], (path, method)
    def body(path: str) -> dict:
        return OPENAPI["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat = {"model": "agentloop", "max_tokens": 8, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    jsonschema.validate(chat, body("/v1/chat/completions"))
    for broken in ({**chat, "messages": []}, {**chat, "messages": [{"role": "wizard", "content": "x"}]},
                   {**chat, "tool_choice": "sometimes"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, body("/v1/chat/completions"))
    jsonschema.validate({"type": "thumbs", "completion_id": "chatcmpl-1", "value": -1}, body("/v1/feedback"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "thumbs", "completion_id": "chatcmpl-1", "score": 1}, body("/v1/feedback"))


# ---------------------------------------------------------------- in-process

IN_PROCESS_EXAMPLES = 200


@pytest.fixture(scope="module")
def inproc(tmp_path_factory):
    """The real app on a FakeEngine, with a real adapter registry (so the admin
    routes work) and a few logged completions (so feedback can reach the store)."""
    from schemathesis.python import asgi

    from agentloop.rl.zero_adapter import write_zero_adapter

    home = tmp_path_factory.mktemp("fuzz-home")
    app = create_app(Settings(home=home, alias="agentloop", admin_key=ADMIN_KEY), engines=[FakeEngine()])
    gw = app.state.gw
    # A base "model" of one config.json is all a zero adapter needs (the FakeEngine loads nothing).
    base = home / "base-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(
        {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1}))
    root = home / "adapters" / "fuzz"
    write_zero_adapter(base, root / "v0000")
    with asgi.get_client(app) as client:
        gw.adapters.bind(root, base_model=str(base))  # what Boot does once it knows the base model
        # One conversation, so pairwise feedback across them can be accepted too.
        ids = [client.post("/v1/chat/completions", json={
            "model": "agentloop", "messages": [{"role": "user", "content": "hello"}], "n": 2}).json()["id"]
            for _ in range(3)]
        yield {"app": app, "completion_ids": ids}
    asgi.shutdown_lifespans()


def _known_ids(body, ids: list[str]) -> None:
    """Point about half of the generated completion ids at logged completions
    (chosen by the id's length, so it stays deterministic): random ids only
    ever reach the 404, real ones reach the ownership, choice and store paths."""
    if not isinstance(body, dict):
        return
    for key in ("completion_id", "chosen_id", "rejected_id"):
        v = body.get(key)
        if isinstance(v, str) and len(v) % 2 == 0:
            body[key] = ids[len(v) % len(ids)]


def _steer_chat(body, models: list[str]) -> None:
    """Agreement between fields that a schema cannot state, for most bodies
    (chosen by the generated values, so it stays deterministic): a served
    model name (3 in 4; the rest reach the 404), and a named tool_choice that
    names one of the tools sent. Without it nearly every case stops at those
    two checks and never reaches the engine call, the stream or the log."""
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and len(model) % 4:
        body["model"] = models[len(model) % len(models)]
    choice, tools = body.get("tool_choice"), body.get("tools")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        if not isinstance(tools, list) or not tools:
            tools = body["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
        names = [t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
                 and isinstance(t["function"].get("name"), str)]
        if names:
            choice["function"]["name"] = names[len(tools) % len(names)]


in_process = schemathesis.openapi.from_dict(OPENAPI, config=_config(IN_PROCESS_EXAMPLES, coverage=True))


@in_process.parametrize()
def test_fuzz_in_process(case, inproc):
    headers = {}
    if case.path.startswith("/admin") and case.path != "/admin/train":
        # /admin/train is fuzzed without the key (401s): with it, each case
        # would start a real training process.
        headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    # Steering edits a copy: generated cases share nested objects.
    if case.path == "/v1/feedback" and case.method == "POST":
        case.body = copy.deepcopy(case.body)
        _known_ids(case.body, inproc["completion_ids"])
    if case.path == "/v1/chat/completions":
        case.body = copy.deepcopy(case.body)
        _steer_chat(case.body, ["agentloop", "agentloop@v0000"])
    response = case.call(app=inproc["app"], headers=headers, timeout=60)
    _record("in_process", case, response)
    check_outcome(case, response)


# ---------------------------------------------------------------- real server

REAL_EXAMPLES = 50
REAL_KEY = "fuzz-real-server"  # its own caller: other tests' views of the log stay untouched


# Only what a user key can reach: the admin routes change the shared server's
# live adapter (they are fuzzed in-process above).
real_server = schemathesis.openapi.from_dict(OPENAPI, config=_config(REAL_EXAMPLES, coverage=False)).include(
    path_regex=r"^/(v1/|health$)")


def _cap_generation(body) -> None:
    """Keep generations tiny on the real engine without making an invalid body valid."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > REAL_MAX_TOKENS:
            body[key] = REAL_MAX_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = REAL_MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > REAL_MAX_N:
        body["n"] = REAL_MAX_N


@real_server.parametrize()
def test_fuzz_real_server(case, server):
    if case.path == "/v1/chat/completions":
        case.body = copy.deepcopy(case.body)  # generated cases share nested objects
        _steer_chat(case.body, ["agentloop", "agentloop@v0000"])
        _cap_generation(case.body)
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {REAL_KEY}"}, timeout=120)
    _record("real_server", case, response)
    check_outcome(case, response)


def test_real_server_healthy_after_fuzz(server, client):
    """Runs after the fuzz (file order): the gateway still serves a normal request."""
    assert httpx.get(f"{server.url}/health", timeout=10).json()["ready"] is True
    r = client.chat.completions.create(model="agentloop", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
