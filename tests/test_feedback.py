"""POST/GET /v1/feedback against the in-process app (fake engine, real SQLite in tmp_path).

Pins the public contract of serve/services/feedback.py: each feedback type, durability
before the 200, idempotency, ownership (404 for others' completions), the
OpenAI error shape for every bad body, and the list filters and cursor.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from agentloop.serve.http.app import create_app
from agentloop.serve.http.auth import caller_of
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from tests.test_gateway_unit import FakeEngine

MSG = [{"role": "user", "content": "hello"}]
ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


class ChoicesEngine(FakeEngine):
    """Non-streaming replies with `n` distinct choices, different on every call."""

    calls = 0

    async def chat(self, body):
        self.bodies.append(body)
        ChoicesEngine.calls += 1
        rid = "chatcmpl-" + body.get("_request_id", "x")
        yield {"id": rid, "object": "chat.completion", "created": 1, "model": body["model"],
               "choices": [{"index": i, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"answer {ChoicesEngine.calls}.{i}"}}
                           for i in range(body.get("n") or 1)],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def make_client(tmp_path) -> TestClient:
    app = create_app(Settings(home=tmp_path, alias="agentloop"), engines=[ChoicesEngine()])
    app.state.gw.router.add_version("v0000", str(tmp_path / "adapters" / "v0000"), live=True)
    return TestClient(app)


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def complete(c: TestClient, headers=ALICE, messages=MSG, **kw) -> str:
    r = c.post("/v1/chat/completions", json={"model": "agentloop", "messages": messages, **kw}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def post(c: TestClient, body, headers=ALICE, key: str | None = None):
    h = dict(headers)
    if key is not None:
        h["Idempotency-Key"] = key
    if isinstance(body, (bytes, str)):
        return c.post("/v1/feedback", content=body, headers={**h, "content-type": "application/json"})
    return c.post("/v1/feedback", json=body, headers=h)


def assert_openai_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    return err


CORRECTION = {"role": "assistant", "content": None, "reasoning_content": "need the tool",
              "tool_calls": [{"id": "call_1", "type": "function",
                              "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]}


def test_each_type_is_accepted_stored_and_listed(client, tmp_path):
    a = complete(client)
    b = complete(client)  # a regenerate: same conversation
    n2 = complete(client, messages=[{"role": "user", "content": "two please"}], n=2)
    bodies = [
        {"completion_id": a, "type": "thumbs", "value": 1, "comment": "nice"},
        {"completion_id": a, "type": "rating", "value": 4},
        {"completion_id": b, "type": "correction", "correction": CORRECTION},
        {"type": "pairwise", "chosen_id": b, "rejected_id": a},
        {"type": "pairwise", "chosen_id": n2, "chosen_index": 1, "rejected_id": n2, "rejected_index": 0},
    ]
    got = []
    for body in bodies:
        r = post(client, body)
        assert r.status_code == 200, r.text
        fb = r.json()
        assert fb["id"].startswith("fb-") and fb["object"] == "feedback" and isinstance(fb["created_at"], int)
        assert {k: fb[k] for k in body} == body
        assert fb["version"] == "v0000" and fb["conversation_hash"]
        got.append(fb)
    assert got[3]["version"] == "v0000" and got[4]["chosen_index"] == 1
    listed = client.get("/v1/feedback", headers=ALICE).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [x["id"] for x in listed["data"]] == [x["id"] for x in reversed(got)]  # newest first
    assert listed["data"][2]["correction"] == CORRECTION
    assert listed["first_id"] == got[-1]["id"] and listed["last_id"] == got[0]["id"]
    # Feedback is private to its caller.
    assert client.get("/v1/feedback", headers=BOB).json()["data"] == []


def test_feedback_is_committed_before_the_200(client, tmp_path):
    cid = complete(client)
    r = post(client, {"completion_id": cid, "type": "thumbs", "value": -1})
    assert r.status_code == 200
    other = Store(f"sqlite:///{tmp_path / 'agentloop.db'}")  # a separate connection pool
    try:
        row = other.get_feedback(r.json()["id"])
    finally:
        other.close()
    assert row is not None and row["value"] == -1 and row["completion_id"] == cid
    assert row["caller"].startswith("key-") and row["caller"] != "alice-key"  # never the raw key


def test_idempotent_retry_returns_the_first_response(client):
    cid = complete(client)
    body = {"completion_id": cid, "type": "rating", "value": 5}
    r1 = post(client, body, key="k-1")
    r2 = post(client, json.dumps(body, indent=2), key="k-1")  # same meaning, other formatting
    assert r1.status_code == r2.status_code == 200
    assert r1.json() == r2.json()
    store = client.app.state.gw.store
    assert store.count_feedback(completion_id=cid) == 1
    # The same key with another body is a client bug, said loudly.
    err = assert_openai_error(post(client, {**body, "value": 1}, key="k-1"), 409, "idempotency_key_reused")
    assert err["param"] == "Idempotency-Key"
    assert store.count_feedback(completion_id=cid) == 1
    # Keys are per caller and per key.
    assert post(client, body, key="k-2").json()["id"] != r1.json()["id"]
    bob_cid = complete(client, headers=BOB)
    assert post(client, {**body, "completion_id": bob_cid}, headers=BOB, key="k-1").status_code == 200
    assert store.count_feedback() == 3
    assert_openai_error(post(client, body, key=" "), 400)
    assert_openai_error(post(client, body, key="x" * 300), 400)


def test_unknown_and_foreign_completions_are_indistinguishable_404s(client):
    mine = complete(client)
    theirs = complete(client, headers=BOB)
    e1 = assert_openai_error(post(client, {"completion_id": "chatcmpl-nope", "type": "thumbs", "value": 1}),
                             404, "completion_not_found")
    e2 = assert_openai_error(post(client, {"completion_id": theirs, "type": "thumbs", "value": 1}),
                             404, "completion_not_found")
    assert e1["message"].replace("chatcmpl-nope", "X") == e2["message"].replace(theirs, "X")
    e3 = assert_openai_error(post(client, {"type": "pairwise", "chosen_id": mine, "rejected_id": theirs}),
                             404, "completion_not_found")
    assert e3["param"] == "rejected_id"
    assert client.app.state.gw.store.count_feedback() == 0


def caller_id(headers) -> str:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return caller_of(Request({"type": "http", "headers": raw}))


def test_failed_completion_takes_no_feedback(client):
    client.app.state.gw.store.insert_completions([{
        "id": "chatcmpl-failed", "caller": caller_id(ALICE), "model": "agentloop", "stream": False,
        "status_code": 503, "request": {"messages": MSG}}])
    assert_openai_error(post(client, {"completion_id": "chatcmpl-failed", "type": "thumbs", "value": 1}),
                        400, "completion_not_successful")


BAD_BODIES = [
    ("not json", b"{nope", None),
    ("json array", b"[1, 2]", None),
    ("unknown type", {"completion_id": "C", "type": "stars", "value": 1}, "type"),
    ("missing type", {"completion_id": "C", "value": 1}, "type"),
    ("thumbs 2", {"completion_id": "C", "type": "thumbs", "value": 2}, "value"),
    ("thumbs true", {"completion_id": "C", "type": "thumbs", "value": True}, "value"),
    ("rating 0", {"completion_id": "C", "type": "rating", "value": 0}, "value"),
    ("rating 6", {"completion_id": "C", "type": "rating", "value": 6}, "value"),
    ("rating float", {"completion_id": "C", "type": "rating", "value": 4.5}, "value"),
    ("no completion id", {"type": "thumbs", "value": 1}, "completion_id"),
    ("completion id not str", {"completion_id": 7, "type": "thumbs", "value": 1}, "completion_id"),
    ("unknown field", {"completion_id": "C", "type": "thumbs", "value": 1, "score": 3}, "score"),
    ("comment not str", {"completion_id": "C", "type": "thumbs", "value": 1, "comment": 5}, "comment"),
    ("comment too long", {"completion_id": "C", "type": "thumbs", "value": 1, "comment": "x" * 5000}, "comment"),
    ("correction missing", {"completion_id": "C", "type": "correction"}, "correction"),
    ("correction without role", {"completion_id": "C", "type": "correction", "correction": {"content": "x"}},
     "correction.role"),
    ("correction user role", {"completion_id": "C", "type": "correction",
                              "correction": {"role": "user", "content": "x"}}, "correction.role"),
    ("correction content list", {"completion_id": "C", "type": "correction",
                                 "correction": {"role": "assistant", "content": [{"type": "text"}]}},
     "correction.content"),
    ("correction empty", {"completion_id": "C", "type": "correction",
                          "correction": {"role": "assistant", "content": None}}, "correction.content"),
    ("tool args not json", {"completion_id": "C", "type": "correction", "correction": {
        "role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}},
     "correction.tool_calls[0].function.arguments"),
    ("tool without name", {"completion_id": "C", "type": "correction", "correction": {
        "role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}},
     "correction.tool_calls[0].function.name"),
    ("pairwise same id", {"type": "pairwise", "chosen_id": "C", "rejected_id": "C"}, "rejected_id"),
    ("pairwise same index", {"type": "pairwise", "chosen_id": "C", "rejected_id": "C",
                             "chosen_index": 1, "rejected_index": 1}, "rejected_id"),
    ("pairwise bad index", {"type": "pairwise", "chosen_id": "C", "rejected_id": "D", "chosen_index": -1},
     "chosen_index"),
]


@pytest.mark.parametrize("name,body,param", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_are_openai_shaped_400s(client, name, body, param):
    cid = complete(client)
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"C"', json.dumps(cid)))
    err = assert_openai_error(post(client, body), 400)
    if param is not None:
        assert err["param"] == param, err
    assert client.app.state.gw.store.count_feedback() == 0


def test_pairwise_needs_one_conversation_and_existing_choices(client):
    a = complete(client)
    other = complete(client, messages=[{"role": "user", "content": "something else"}])
    assert_openai_error(post(client, {"type": "pairwise", "chosen_id": a, "rejected_id": other}),
                        400, "conversation_mismatch")
    # Same messages but different tools is a different conversation too.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = complete(client, tools=tools)
    assert_openai_error(post(client, {"type": "pairwise", "chosen_id": a, "rejected_id": with_tools}), 400)
    err = assert_openai_error(post(client, {"type": "pairwise", "chosen_id": a, "chosen_index": 0,
                                            "rejected_id": a, "rejected_index": 3}), 400)
    assert err["param"] == "rejected_index"


def test_oversized_body_is_413(client):
    r = post(client, {"completion_id": "x", "type": "thumbs", "value": 1, "comment": "x" * 1_100_000})
    assert_openai_error(r, 413, "request_too_large")


def test_list_filters_and_cursor(client):
    store = client.app.state.gw.store
    a, b = complete(client), complete(client)
    ids = [post(client, {"completion_id": a, "type": "thumbs", "value": 1}).json()["id"],
           post(client, {"completion_id": b, "type": "rating", "value": 2}).json()["id"]]
    t_mid = time.time()
    ids.append(post(client, {"type": "pairwise", "chosen_id": a, "rejected_id": b}).json()["id"])
    # A completion of another version, logged directly.
    me = caller_id(ALICE)
    old = store.get_completion(a)
    store.insert_completions([{**old, "id": "chatcmpl-v1", "version": "v0001", "caller": me}])
    ids.append(post(client, {"completion_id": "chatcmpl-v1", "type": "thumbs", "value": -1}).json()["id"])

    def listed(**params):
        r = client.get("/v1/feedback", params=params, headers=ALICE)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["data"]]

    assert listed() == ids[::-1]
    assert listed(type="thumbs") == [ids[3], ids[0]]
    assert listed(completion_id=a) == [ids[2], ids[0]]  # a pairwise side counts
    assert listed(version="v0001") == [ids[3]]
    assert listed(version="v0000", type="rating") == [ids[1]]
    assert listed(since=t_mid) == [ids[3], ids[2]]
    page1 = client.get("/v1/feedback", params={"limit": 3}, headers=ALICE).json()
    assert [x["id"] for x in page1["data"]] == ids[:0:-1] and page1["has_more"] is True
    page2 = client.get("/v1/feedback", params={"limit": 3, "after": page1["last_id"]}, headers=ALICE).json()
    assert [x["id"] for x in page2["data"]] == [ids[0]] and page2["has_more"] is False
    for params, param in [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
                          ({"since": "yesterday"}, "since"), ({"since": "nan"}, "since"),
                          ({"type": "stars"}, "type"), ({"after": "fb-nope"}, "after")]:
        err = assert_openai_error(client.get("/v1/feedback", params=params, headers=ALICE), 400)
        assert err["param"] == param
    # Someone else's feedback id is no cursor: it would leak where it sorts.
    assert_openai_error(client.get("/v1/feedback", params={"after": ids[0]}, headers=BOB), 400)


def test_feedback_right_after_completion_waits_for_the_log(tmp_path):
    with make_client(tmp_path) as c:
        gw = c.app.state.gw
        # The log row is written off the response path; hold it in the writer's
        # batch so the feedback call certainly arrives first and must wait for it.
        gw.writer.flush_interval = 60
        cid = complete(c)
        assert gw.store.get_completion(cid) is None
        r = post(c, {"completion_id": cid, "type": "thumbs", "value": 1})
        assert r.status_code == 200, r.text
        assert gw.store.get_completion(cid) is not None
