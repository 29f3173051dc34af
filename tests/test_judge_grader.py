"""The judge grader (rl/graders/judge.py): against a stand-in OpenAI server that answers what a test
says (a score, garbage, an error, nothing in time), and against the real engine of the session."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agentloop.rl.graded import best_and_worst, score_candidates
from agentloop.rl.graders import Case, GraderConfigError, build_graders
from agentloop.rl.graders.judge import render_prompt

ASK = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
ANSWER = {"role": "assistant", "content": "Paris."}


class Judge:
    """An OpenAI-compatible /v1/chat/completions on loopback whose answer the test sets."""

    def __init__(self):
        self.content: str = ""
        self.status = 200
        self.delay = 0.0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.bodies.append(body)
                judge.headers.append(dict(self.headers))
                time.sleep(judge.delay)
                out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": judge.content}}]}
                                 if judge.status == 200 else {"error": {"message": "overloaded"}}).encode()
                self.send_response(judge.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def judge():
    j = Judge()
    yield j
    j.server.shutdown()


def grade(judge_url: str, case: Case, **opts):
    (g,) = build_graders([{"type": "judge", "base_url": judge_url, "model": "judge-model", **opts}]).grade(case)
    return g


def test_the_judges_score_becomes_the_grade(judge, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-judge")
    judge.content = json.dumps({"score": 8, "reason": "correct and short"})
    g = grade(judge.url, Case(ASK, ANSWER, {"role": "assistant", "content": "Paris"}), api_key_env="JUDGE_KEY")
    assert (g.score, g.status) == (0.8, "ok") and g.reason == "judge judge-model: correct and short"
    body = judge.bodies[-1]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["response_format"]["json_schema"]["schema"]["properties"]["score"]["maximum"] == 10
    prompt = body["messages"][0]["content"]
    assert "What is the capital of France?" in prompt and "Answer to grade:\nParis." in prompt
    assert "A reference answer known to be good:\nParis" in prompt
    assert judge.headers[-1]["Authorization"] == "Bearer sk-judge"


@pytest.mark.parametrize("content, status, needle", [
    ("I think it is good.", 200, "no JSON score"),
    (json.dumps({"score": "nine", "reason": "x"}), 200, "not in 0..10"),
    (json.dumps({"score": 11, "reason": "x"}), 200, "not in 0..10"),
    (json.dumps({"verdict": 3}), 200, "no JSON score"),
    ("", 503, "answered 503"),
])
def test_a_judge_that_answers_garbage_is_a_failed_grade(judge, content, status, needle):
    judge.content, judge.status = content, status
    g = grade(judge.url, Case(ASK, ANSWER))
    assert g.status == "failed" and g.score is None and needle in g.reason, g


def test_a_judge_too_slow_or_gone_is_a_failed_grade(judge):
    judge.content, judge.delay = json.dumps({"score": 5, "reason": "x"}), 3.0
    g = grade(judge.url, Case(ASK, ANSWER), timeout=0.5)
    assert g.status == "failed" and "did not answer within 0.5s" in g.reason
    url = judge.url
    judge.server.shutdown()
    judge.server.server_close()
    g = grade(url, Case(ASK, ANSWER))
    assert g.status == "failed" and "cannot be reached" in g.reason
    (g,) = build_graders([{"type": "judge"}]).grade(Case(ASK, ANSWER))  # no engine to ask
    assert g.status == "failed" and "needs the deployment's engine" in g.reason


def test_the_prompt_shows_calls_and_tools():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": {"type": "object"}}}]
    p = render_prompt("judge_score", messages=ASK["messages"], tools=tools,
                      candidate={"role": "assistant", "content": None, "tool_calls": [
                          {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                      reference=None)
    assert "- get_weather: Weather now parameters {\"type\": \"object\"}" in p
    assert '(calls get_weather with {"city": "Paris"})' in p and "reference answer" not in p


def test_the_deployments_own_engine_judges(server):
    """The served one: the session's real engine, its JSON constrained by the schema."""
    with httpx.Client(base_url=server.engine_url) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    gs = build_graders([{"type": "judge", "max_tokens": 512}], served=lambda: (f"{server.engine_url}/v1", model))
    (g,) = gs.grade(Case(ASK, ANSWER))
    # The tiny test model's opinion is noise, but it is well-formed: a score in [0, 1] and a reason.
    assert g.status == "ok" and 0.0 <= g.score <= 1.0 and g.reason.startswith(f"judge {model}:"), g


# ---------------------------------------------------------------- rank mode

ANSWERS = [{"role": "assistant", "content": "Paris."}, {"role": "assistant", "content": "Lyon."},
           {"role": "assistant", "content": "It is Paris, on the Seine."}]


def test_a_ranking_judge_scores_all_answers_in_one_call(judge):
    judge.content = json.dumps({"scores": [9, 1, 10], "reason": "the third is complete, the second wrong"})
    gs = build_graders([{"type": "judge", "mode": "rank", "base_url": judge.url, "model": "judge-model"},
                        {"type": "string_check", "name": "exact", "operation": "eq", "value": "Paris."}])
    scored = score_candidates(gs, ASK, ANSWERS, {"role": "assistant", "content": "Paris"})
    assert len(judge.bodies) == 1  # one prompt for the three answers
    assert [[(g.grader, g.score) for g in s.grades] for s in scored] == [
        [("judge", 0.9), ("exact", 1.0)], [("judge", 0.1), ("exact", 0.0)], [("judge", 1.0), ("exact", 0.0)]]
    assert scored[2].grades[0].reason == "judge judge-model, ranked 3 of 3 (10/10): the third is complete, the second wrong"
    best, worst = best_and_worst(scored, 0.25)
    assert best is scored[0] and worst is scored[1]  # (0.9 + 1) / 2 beats (1.0 + 0) / 2
    schema = judge.bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["scores"]["minItems"] == schema["properties"]["scores"]["maxItems"] == 3
    prompt = judge.bodies[0]["messages"][0]["content"]
    assert "comparing 3 answers" in prompt and "Answer 2:\nLyon." in prompt and "known to be good:\nParis" in prompt
    # One answer (POST /admin/grade) is ranked by itself: the same prompt, a list of one.
    judge.content = json.dumps({"scores": [7], "reason": "fine"})
    (g,) = gs.grade(Case(ASK, ANSWERS[0]))[:1]
    assert (g.score, g.status) == (0.7, "ok") and "ranked 1 of 1" in g.reason
    assert judge.bodies[-1]["response_format"]["json_schema"]["schema"]["properties"]["scores"]["maxItems"] == 1


@pytest.mark.parametrize("content, needle", [
    (json.dumps({"scores": [9, 1], "reason": "x"}), "scored 2 of 3"),
    (json.dumps({"scores": [9, 1, 42], "reason": "x"}), "not in 0..10"),
    (json.dumps({"score": 9, "reason": "x"}), "no JSON scores"),
    ("[9, 1, 4]", "no JSON scores"),
])
def test_a_ranking_judge_that_answers_garbage_fails_each_grade_and_nothing_else(judge, content, needle):
    judge.content = content
    gs = build_graders([{"type": "judge", "mode": "rank", "base_url": judge.url, "model": "m"},
                        {"type": "string_check", "name": "exact", "operation": "eq", "value": "Paris."}])
    scored = score_candidates(gs, ASK, ANSWERS)
    for s in scored:
        judged, exact = s.grades
        assert judged.status == "failed" and judged.score is None and needle in judged.reason, judged
        assert exact.status == "ok"  # the other grader's grades stand
    assert [s.score for s in scored] == [1.0, 0.0, 0.0]


def test_rank_mode_is_checked():
    with pytest.raises(GraderConfigError, match="mode"):
        build_graders([{"type": "judge", "mode": "vote"}])
    (d,) = build_graders([{"type": "judge", "mode": "rank"}]).describe()
    assert d["mode"] == "rank" and d["prompt"] == "judge_rank"
    assert build_graders([{"type": "judge"}]).describe()[0]["prompt"] == "judge_score"


def test_the_deployments_own_engine_ranks(server):
    """Rank mode on the session's real engine: one constrained answer with one score per candidate."""
    with httpx.Client(base_url=server.engine_url) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    gs = build_graders([{"type": "judge", "mode": "rank", "max_tokens": 512}],
                       served=lambda: (f"{server.engine_url}/v1", model))
    scored = score_candidates(gs, ASK, ANSWERS[:2])
    # The tiny model's opinion is noise, but well-formed: two scores in [0, 1] from one answer.
    assert all(s.grades[0].status == "ok" and 0.0 <= s.score <= 1.0 for s in scored), [s.grades for s in scored]
    assert "ranked 2 of 2" in scored[1].grades[0].reason
