"""Reference feedback and `POST /admin/grade` through the in-process app (fake engine, real SQLite).

Reference feedback is stored, listed and refused like the other kinds (shape, ownership,
idempotency), and graded by the deployment's graders once committed; `/admin/grade` returns
each applicable grader's score and reason and stores every grade with its grader's version.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from agentloop.serve.http.app import create_app
from agentloop.serve.settings import Settings
from tests.test_feedback import ALICE, BOB, assert_openai_error, complete, post
from tests.test_gateway_unit import FakeEngine

ADMIN = {"Authorization": "Bearer grading-admin"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class CallingEngine(FakeEngine):
    """Calls get_weather for Paris when the request offers tools, else answers in text."""

    async def chat(self, body):
        rid = "chatcmpl-" + body.get("_request_id", "x")
        if body.get("tools"):
            msg = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]}
        else:
            msg = {"role": "assistant", "content": "Sunny in Paris."}
        yield {"id": rid, "object": "chat.completion", "created": 1, "model": body["model"],
               "choices": [{"index": 0, "finish_reason": "stop", "message": msg}],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(home=tmp_path, alias="agentloop", admin_key="grading-admin"), engines=[CallingEngine()])
    app.state.gw.router.add_version("v0000", str(tmp_path / "adapters" / "v0000"), live=True)
    with TestClient(app) as c:
        yield c


def ref_call(city: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


def grades_of(c: TestClient, cid: str, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get("/admin/grades", params={"completion_id": cid}, headers=ADMIN)
        assert r.status_code == 200, r.text
        if len(r.json()["data"]) >= n or time.monotonic() > deadline:
            return r.json()["data"]
        time.sleep(0.05)


def test_reference_feedback_is_stored_listed_and_graded(client):
    cid = complete(client, messages=ASK, tools=[WEATHER])
    r = post(client, {"type": "reference", "completion_id": cid, "reference": ref_call("paris"),
                      "comment": "the call I wanted"}, key="ref-1")
    assert r.status_code == 200, r.text
    fb = r.json()
    assert fb["type"] == "reference" and fb["reference"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert fb["correction"] is None and fb["version"] == "v0000"
    # A retry with the same key gets the same row; the list shows it, filtered by type.
    assert post(client, {"type": "reference", "completion_id": cid, "reference": ref_call("paris"),
                         "comment": "the call I wanted"}, key="ref-1").json()["id"] == fb["id"]
    listed = client.get("/v1/feedback", params={"type": "reference"}, headers=ALICE).json()["data"]
    assert [f["id"] for f in listed] == [fb["id"]]
    # Graded once committed, by every grader that applies, against that reference.
    got = {g["grader"]: g for g in grades_of(client, cid, 2)}
    assert set(got) == {"tool_schema", "reference_call"}
    assert got["reference_call"]["score"] == 1.0 and got["reference_call"]["feedback_id"] == fb["id"]
    assert got["tool_schema"]["score"] == 1.0 and got["tool_schema"]["grader_version"] == "1"
    assert all(g["version"] == "v0000" and g["status"] == "ok" and g["reason"] for g in got.values())


@pytest.mark.parametrize("body, param", [
    ({"type": "reference", "completion_id": "X"}, "reference"),
    ({"type": "reference", "completion_id": "X", "reference": "Paris"}, "reference"),
    ({"type": "reference", "completion_id": "X", "reference": {"role": "user", "content": "a"}}, "reference.role"),
    ({"type": "reference", "completion_id": "X", "reference": {"role": "assistant"}}, "reference.content"),
    ({"type": "reference", "completion_id": "X", "reference": {"role": "assistant", "content": "a", "x": 1}},
     "reference.x"),
    ({"type": "reference", "completion_id": "X", "reference": {"role": "assistant", "content": "a"}, "value": 1},
     "value"),
    ({"type": "reference", "completion_id": "X", "reference": {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}}, "reference.tool_calls[0].function.arguments"),
])
def test_malformed_reference_feedback_is_a_400(client, body, param):
    body = {**body, "completion_id": complete(client)}
    err = assert_openai_error(post(client, body), 400)
    assert err["param"] == param


def test_reference_feedback_on_another_callers_completion_is_a_404(client):
    cid = complete(client, headers=ALICE)
    r = post(client, {"type": "reference", "completion_id": cid, "reference": {"role": "assistant", "content": "x"}},
             headers=BOB)
    assert_openai_error(r, 404, "completion_not_found")


def test_admin_grade_tries_the_graders_and_stores_each_grade(client):
    cid = complete(client, messages=ASK, tools=[WEATHER])
    r = client.post("/admin/grade", json={"completion_id": cid, "reference": ref_call("Lyon")}, headers=ADMIN)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["completion_id"] == cid and out["version"] == "v0000" and out["reference"] == ref_call("Lyon")
    by = {g["grader"]: g for g in out["data"]}
    assert by["tool_schema"]["score"] == 1.0
    assert by["reference_call"]["score"] == 0.0 and '"Lyon"' in by["reference_call"]["reason"]
    stored = grades_of(client, cid, 2)
    assert {(g["grader"], g["score"], g["grader_type"]) for g in stored} == {
        ("tool_schema", 1.0, "tool_schema"), ("reference_call", 0.0, "reference_call")}
    assert all(g["feedback_id"] is None and g["reference"] == ref_call("Lyon") for g in stored)
    # Without a reference (none given, no reference feedback): only graders that need none.
    out = client.post("/admin/grade", json={"completion_id": cid}, headers=ADMIN).json()
    assert [g["grader"] for g in out["data"]] == ["tool_schema"] and out["reference"] is None
    # A text answer against a text reference: the string check.
    tid = complete(client, messages=ASK)
    out = client.post("/admin/grade", json={"completion_id": tid,
                                            "reference": {"role": "assistant", "content": "Sunny in Paris."}},
                      headers=ADMIN).json()
    assert [(g["grader"], g["score"]) for g in out["data"]] == [("reference_text", 1.0)]
    assert [g["name"] for g in client.get("/admin/graders", headers=ADMIN).json()["data"]] == [
        "tool_schema", "reference_call", "reference_text"]
    by_version = client.get("/admin/grades", params={"version": "agentloop@v0000"}, headers=ADMIN).json()["data"]
    assert len(by_version) == 4  # 2 + 1 + 1, every grade made above


def test_admin_grade_refuses_bad_calls(client):
    cid = complete(client)
    assert_openai_error(client.post("/admin/grade", json={"completion_id": "nope"}, headers=ADMIN), 404,
                        "completion_not_found")
    assert_openai_error(client.post("/admin/grade", json={}, headers=ADMIN), 400)
    assert_openai_error(client.post("/admin/grade", json={"completion_id": cid, "refrence": {}}, headers=ADMIN), 400)
    err = assert_openai_error(client.post("/admin/grade", json={"completion_id": cid, "reference": {"role": "user"}},
                                          headers=ADMIN), 400)
    assert err["param"] == "reference.role"
    assert client.post("/admin/grade", json={"completion_id": cid}, headers=ALICE).status_code in (401, 403)


def test_a_judge_without_a_url_asks_the_deployments_engine(client):
    gw = client.app.state.gw
    assert gw._served() == ("fake://engine/v1", "agentloop-base")  # v0000 live: the bare base weights
    gw.router.add_version("v0001", "/adapters/v0001", live=True)
    assert gw._served() == ("fake://engine/v1", "agentloop@v0001")


def test_tool_results_sent_back_grade_the_call_that_made_them(client):
    def ask(messages, headers=ALICE):
        r = client.post("/v1/chat/completions", json={"model": "agentloop", "messages": messages, "tools": [WEATHER]},
                        headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    first = ask(ASK)
    made = first["choices"][0]["message"]
    (tc,) = made["tool_calls"]
    failed = ASK + [made, {"role": "tool", "tool_call_id": tc["id"], "content": "Error: weather service down"}]
    ask(failed)
    (g,) = grades_of(client, first["id"], 1)
    assert (g["grader"], g["grader_type"], g["score"], g["status"]) == ("tool_outcome", "tool_outcome", 0.0, "ok")
    assert "get_weather reported an error: Error: weather service down" in g["reason"] and g["version"] == "v0000"
    # The conversation goes on and repeats the result, another caller sends the same: one grade.
    ask(failed + [{"role": "user", "content": "And now?"}])
    ask(failed)
    ask(failed, headers=BOB)
    time.sleep(0.5)
    assert len(grades_of(client, first["id"], 2, timeout=0.5)) == 1
    # A result that is not an error grades the call 1.
    second = ask([{"role": "user", "content": "Weather in Lyon?"}])
    made = second["choices"][0]["message"]
    ask([{"role": "user", "content": "Weather in Lyon?"}, made,
         {"role": "tool", "tool_call_id": made["tool_calls"][0]["id"], "content": '{"temperature": 18}'}])
    (g,) = grades_of(client, second["id"], 1)
    assert g["score"] == 1.0 and "get_weather answered" in g["reason"]


def test_grades_are_stored_once_and_summarised_on_both_databases(db_url):
    from agentloop.serve.store.db import Store

    store = Store(db_url)
    try:
        row = {"completion_id": "c1", "version": "v0001", "grader": "reference_call", "grader_type": "reference_call",
               "grader_version": "1", "score": 1.0, "status": "ok", "reason": "match",
               "reference": {"role": "assistant", "content": "x"}}
        assert len(store.insert_grades([row, {**row, "score": 0.0}, {**row, "score": None, "status": "failed"}])) == 3
        once = {**row, "id": "grade-outcome-1", "grader": "tool_outcome", "grader_type": "tool_outcome"}
        assert len(store.insert_grades([once])) == 1 and store.insert_grades([once]) == []  # its id: once
        with pytest.raises(ValueError):
            store.insert_grades([{**row, "status": "maybe"}])
        assert store.grade_summary() == [
            {"version": "v0001", "grader": "reference_call", "n": 3, "failed": 1, "mean_score": pytest.approx(0.5)},
            {"version": "v0001", "grader": "tool_outcome", "n": 1, "failed": 0, "mean_score": pytest.approx(1.0)}]
        got = store.list_grades(completion_id="c1", grader="reference_call")
        assert len(got) == 3 and got[0]["reference"] == {"role": "assistant", "content": "x"}
    finally:
        store.close()
