"""Graders (rl/graders) on hand-made cases, hostile ones included, and their configuration."""

from __future__ import annotations

import json

import pytest

from agentloop.rl.graders import BUILT_IN, Case, Grader, GraderConfigError, build_graders, grade_all, same_value
from agentloop.serve.settings import Settings

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "minimum": 1}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "required": ["tz"], "properties": {"tz": {"type": "string"}}}}}
REQUEST = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, TIME]}


def call(name: str, args) -> dict:
    return {"type": "function", "function": {"name": name,
                                             "arguments": args if isinstance(args, str) else json.dumps(args)}}


def calls(*cs) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(cs)}


def text(s) -> dict:
    return {"role": "assistant", "content": s}


def grades(candidate, reference=None, specs=None, request=REQUEST) -> dict:
    out = build_graders(specs).grade(Case(request, candidate, reference))
    return {g.grader: g for g in out}


# ---------------------------------------------------------------- tool_schema

def test_tool_schema_scores_the_share_of_valid_calls():
    ok = grades(calls(call("get_weather", {"city": "Paris", "unit": "celsius"})))["tool_schema"]
    assert (ok.score, ok.status) == (1.0, "ok")
    half = grades(calls(call("get_weather", {"city": "Paris"}), call("get_weather", {"unit": "kelvin"})))
    g = half["tool_schema"]
    assert g.score == 0.5 and "'city' is a required property" in g.reason
    for bad, why in [(call("get_weather", "{not json"), "not a JSON object"),
                     (call("get_weather", "[1, 2]"), "not a JSON object"),
                     (call("send_email", {"to": "x"}), "no tool named 'send_email'"),
                     (call("get_weather", {"city": "Paris", "days": 0}), "days"),
                     (call("get_weather", {"city": 3}), "city")]:
        g = grades(calls(bad))["tool_schema"]
        assert g.score == 0.0 and why in g.reason, (bad, g)
    # A call when the request offers no tools at all is invalid too; a text answer is not graded.
    assert grades(calls(call("get_weather", {"city": "P"})), request={"messages": []})["tool_schema"].score == 0.0
    assert "tool_schema" not in grades(text("Sunny."))


def test_a_tool_with_a_broken_schema_fails_the_grade_with_its_reason():
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    g = grades(calls(call("f", {})), request={"messages": [], "tools": [broken]})["tool_schema"]
    assert g.status == "failed" and g.score is None and "invalid parameters schema" in g.reason


# ---------------------------------------------------------------- reference_call

def test_reference_call_follows_bfcl_rules():
    ref = calls(call("get_weather", {"city": "Paris"}))
    score = lambda cand: grades(cand, ref)["reference_call"]  # noqa: E731
    assert score(calls(call("get_weather", {"city": "paris"}))).score == 1.0            # case ignored
    assert score(calls(call("get_weather", {"city": "Paris", "unit": "celsius"}))).score == 1.0  # the default
    g = score(calls(call("get_weather", {"city": "Paris", "unit": "fahrenheit"})))
    assert g.score == 0.0 and "adds 'unit' (not its default)" in g.reason
    g = score(calls(call("get_weather", {"city": "Paris", "days": 3})))
    assert g.score == 0.0 and "adds 'days'" in g.reason                                 # no default: not asked for
    g = score(calls(call("get_weather", {"city": "Lyon"})))
    assert g.score == 0.0 and 'city="Lyon", the reference has "Paris"' in g.reason
    assert score(calls(call("get_time", {"tz": "CET"}))).score == 0.0
    assert "calls 'get_time'" in score(calls(call("get_time", {"tz": "CET"}))).reason
    g = score(text("It is sunny in Paris."))
    assert g.score == 0.0 and "answered in text" in g.reason
    g = score(calls(call("get_weather", "{oops")))
    assert g.score == 0.0 and "not a JSON object" in g.reason
    # The reference leaves a default out, the candidate states it, or the other way round: same.
    ref_unit = calls(call("get_weather", {"city": "Paris", "unit": "celsius"}))
    assert grades(calls(call("get_weather", {"city": "Paris"})), ref_unit)["reference_call"].score == 1.0
    # A required parameter the candidate leaves out.
    g = grades(calls(call("get_weather", {})), ref)["reference_call"]
    assert g.score == 0.0 and "leaves out 'city'" in g.reason


def test_parallel_calls_match_in_any_order_and_extras_cost():
    ref = calls(call("get_weather", {"city": "Paris"}), call("get_time", {"tz": "Europe/Paris"}))
    swapped = calls(call("get_time", {"tz": "europe/paris"}), call("get_weather", {"city": "Paris"}))
    assert grades(swapped, ref)["reference_call"].score == 1.0
    one = grades(calls(call("get_weather", {"city": "Paris"})), ref)["reference_call"]
    assert one.score == 0.5 and "get_time" in one.reason
    extra = calls(call("get_weather", {"city": "Paris"}), call("get_time", {"tz": "Europe/Paris"}),
                  call("get_weather", {"city": "Paris"}))
    g = grades(extra, ref)["reference_call"]
    assert g.score == pytest.approx(2 / 3) and "more than the reference" in g.reason
    g = grades(calls(call("get_weather", {"city": "Paris"})), text("Which city?"))["reference_call"]
    assert g.score == 0.0 and "where the reference answers in text" in g.reason
    assert "reference_call" not in grades(text("a"), text("b"))  # text against text: not a call grader's


def test_equivalent_values():
    assert same_value(2, 2.0) and not same_value(True, 1) and not same_value("1", 1)
    assert same_value("New York, NY", "new york ny") and not same_value("NYC", "New York")
    assert same_value([1, "A b"], [1.0, "ab"]) and not same_value([1, 2], [2, 1])
    assert same_value({"a": {"b": "X"}}, {"a": {"b": "x"}}) and not same_value({"a": 1}, {"a": 1, "b": 2})
    assert same_value(None, None) and not same_value(None, "")


# ---------------------------------------------------------------- string_check, regex

def test_string_checks_against_the_reference_or_a_value():
    g = grades(text("  Paris  "), text("Paris"))["reference_text"]
    assert (g.score, g.reason) == (1.0, "equals the reference")
    assert grades(text("paris"), text("Paris"))["reference_text"].score == 0.0
    assert "reference_text" not in grades(text("Paris"))                        # nothing to compare with
    assert "reference_text" not in grades(calls(call("get_time", {"tz": "x"})), text("Paris"))
    specs = [{"type": "string_check", "name": "polite", "operation": "ilike", "value": "please"},
             {"type": "string_check", "name": "not_empty", "operation": "ne", "value": ""},
             {"type": "string_check", "name": "cites", "operation": "like", "value": "[1]"}]
    got = grades(text("Please see [1]."), specs=specs)
    assert {n: g.score for n, g in got.items()} == {"polite": 1.0, "not_empty": 1.0, "cites": 1.0}
    got = grades(text("See 1."), specs=specs)
    assert {n: g.score for n, g in got.items()} == {"polite": 0.0, "not_empty": 1.0, "cites": 0.0}


def test_regex_graders():
    specs = [{"type": "regex", "name": "has_number", "pattern": r"\d+"},
             {"type": "regex", "name": "no_sorry", "pattern": "sorry", "flags": "i", "invert": True}]
    got = grades(text("It is 21 degrees. Sorry!"), specs=specs)
    assert got["has_number"].score == 1.0 and "matches at 6: '21'" in got["has_number"].reason
    assert got["no_sorry"].score == 0.0
    got = grades(text("No idea."), specs=specs)
    assert (got["has_number"].score, got["no_sorry"].score) == (0.0, 1.0)


# ---------------------------------------------------------------- hostile graders, configuration

class Raises(Grader):
    type = "raises"

    def applies(self, case):
        return True

    def score(self, case):
        raise RuntimeError("the grader broke")


class Garbage(Grader):
    type = "garbage"

    def __init__(self, name, value):
        super().__init__(name)
        self.value = value

    def applies(self, case):
        return True

    def score(self, case):
        return self.value, "?"


def test_a_failing_grader_is_a_failed_grade_and_the_others_stand():
    graders = [Raises(), *(Garbage(f"g{i}", v) for i, v in enumerate([1.5, -0.1, float("nan"), "1", True, None])),
               *build_graders().graders]
    out = grade_all(graders, Case(REQUEST, calls(call("get_weather", {"city": "Paris"}))))
    by = {g.grader: g for g in out}
    assert by["raises"].status == "failed" and by["raises"].reason == "RuntimeError: the grader broke"
    for i in range(6):
        assert by[f"g{i}"].status == "failed" and by[f"g{i}"].score is None and "not a number in [0, 1]" in by[f"g{i}"].reason
    assert by["tool_schema"].score == 1.0 and by["tool_schema"].status == "ok"


@pytest.mark.parametrize("specs, needle", [
    ("tool_schema", "must be a list"),
    ([{"type": "judge_by_vibes"}], "type must be one of"),
    (["tool_schema"], "must be an object"),
    ([{"type": "regex"}], "needs a 'pattern'"),
    ([{"type": "regex", "pattern": "(unclosed"}], "regex pattern"),
    ([{"type": "regex", "pattern": "a", "flags": "x"}], "flags"),
    ([{"type": "string_check", "operation": "startswith"}], "operation"),
    ([{"type": "string_check", "valeu": "typo"}], "no option 'valeu'"),
    ([{"type": "tool_schema"}, {"type": "tool_schema"}], "two graders are named"),
    ([{"type": "tool_schema", "name": ""}], "name must be"),
])
def test_bad_grader_specs_are_refused_saying_which(specs, needle):
    with pytest.raises(GraderConfigError, match=needle.replace("(", r"\(")):
        build_graders(specs)


def test_the_setting_is_checked_when_the_gateway_is_configured(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTLOOP_GRADERS", json.dumps([{"type": "regex", "name": "n", "pattern": r"\d"}]))
    assert Settings(home=tmp_path).graders == [{"type": "regex", "name": "n", "pattern": r"\d"}]
    monkeypatch.setenv("AGENTLOOP_GRADERS", json.dumps([{"type": "regex", "pattern": "("}]))
    with pytest.raises(ValueError, match="regex pattern"):
        Settings(home=tmp_path)
    assert set(BUILT_IN) == {"tool_schema", "reference_call", "string_check", "regex", "python", "judge"}
    assert [g["name"] for g in build_graders().describe()] == ["tool_schema", "reference_call", "reference_text"]


# ---------------------------------------------------------------- python graders

def test_a_python_grader_runs_the_deployments_function():
    specs = [{"type": "python", "name": "paris", "function": "tests.grader_functions:city_is_paris"},
             {"type": "python", "name": "same", "function": "tests.grader_functions:against_reference"},
             {"type": "python", "name": "chatty", "function": "tests.grader_functions:chatty"}]
    gs = build_graders(specs)
    try:
        got = {g.grader: g for g in gs.grade(Case(REQUEST, calls(call("get_weather", {"city": "Paris"}))))}
        assert (got["paris"].score, got["paris"].reason) == (1.0, "asks for Paris")
        assert (got["same"].score, got["same"].reason) == (0.0, "other text")
        assert (got["chatty"].score, got["chatty"].status) == (0.25, "ok")
        got = {g.grader: g for g in gs.grade(Case(REQUEST, text("Hi"), text("Hi")))}
        assert got["same"].score == 1.0 and got["paris"].reason == "asks for None"
    finally:
        gs.close()


def test_a_python_grader_that_raises_hangs_or_answers_garbage_fails_with_its_reason():
    import time

    specs = [{"type": "python", "name": "raises", "function": "tests.grader_functions:raises"},
             {"type": "python", "name": "hangs", "function": "tests.grader_functions:hangs", "timeout": 1},
             {"type": "python", "name": "garbage", "function": "tests.grader_functions:garbage"},
             {"type": "python", "name": "missing", "function": "tests.grader_functions:no_such_function"},
             {"type": "tool_schema"}]
    gs = build_graders(specs)
    try:
        t0 = time.monotonic()
        got = {g.grader: g for g in gs.grade(Case(REQUEST, calls(call("get_weather", {"city": "Paris"}))))}
        assert time.monotonic() - t0 < 20
        assert got["raises"].status == "failed" and got["raises"].reason == "RuntimeError: ValueError: no good"
        assert got["hangs"].status == "failed" and "did not answer within 1s" in got["hangs"].reason
        assert got["garbage"].status == "failed" and "not a number in [0, 1]" in got["garbage"].reason
        assert got["missing"].status == "failed" and "has no function 'no_such_function'" in got["missing"].reason
        assert got["tool_schema"].score == 1.0  # the others' grades stand
        hangs = next(g for g in gs.graders if g.name == "hangs")
        assert hangs._proc is None  # killed; the next call starts a new worker
    finally:
        gs.close()


@pytest.mark.parametrize("spec, needle", [
    ({"type": "python"}, "module:function"),
    ({"type": "python", "function": "tests.grader_functions"}, "module:function"),
    ({"type": "python", "function": "no_such_module_xyz:f"}, "no module"),
    ({"type": "python", "function": "tests.grader_functions:raises", "timeout": 0}, "timeout"),
    ({"type": "judge", "base_url": "ftp://x"}, "http"),
    ({"type": "judge", "base_url": "http://x"}, "'model' is needed"),
    ({"type": "judge", "prompt": "../etc/passwd"}, "template"),
    ({"type": "judge", "prompt": "no_such_prompt"}, "template"),
    ({"type": "judge", "api_key_env": "sk-123"}, "environment variable"),
    ({"type": "judge", "max_tokens": 1}, "max_tokens"),
])
def test_bad_python_and_judge_specs_are_refused(spec, needle):
    with pytest.raises(GraderConfigError, match=needle):
        build_graders([spec])


def test_graders_from_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTLOOP_GRADERS", raising=False)
    f = tmp_path / "graders.json"
    f.write_text(json.dumps({"graders": [{"type": "regex", "name": "digits", "pattern": r"\d"}]}))
    assert Settings(home=tmp_path, graders_file=f).graders == [{"type": "regex", "name": "digits", "pattern": r"\d"}]
    f.write_text(json.dumps([{"type": "regex", "pattern": "("}]))
    with pytest.raises(ValueError, match="regex pattern"):
        Settings(home=tmp_path, graders_file=f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="graders_file"):
        Settings(home=tmp_path, graders_file=f)
    with pytest.raises(ValueError, match="not both"):
        Settings(home=tmp_path, graders_file=f, graders=[])


# ---------------------------------------------------------------- tool outcomes

def test_tool_results_at_the_end_of_a_request_are_the_new_outcomes():
    from agentloop.rl.graders import new_tool_outcomes, reports_error

    asked = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
    made = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", **call("get_weather", {"city": "Paris"})}, {"id": "c2", **call("get_weather", {"city": "Lyon"})}]}
    results = [{"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 18}'},
               {"role": "tool", "tool_call_id": "c2", "content": "Error: tool 'get_weather' failed: down"}]
    out = new_tool_outcomes(asked + [made] + results)
    assert [(o.tool_call_id, o.name, o.ok) for o in out] == [("c1", "get_weather", True), ("c2", "get_weather", False)]
    assert all(o.prefix == asked for o in out)
    g = out[1].grade()
    assert (g.grader, g.score) == ("tool_outcome", 0.0) and "reported an error: Error: tool" in g.reason
    # Results are new only at the end; a result of no call of that message, or with no call, is none.
    assert new_tool_outcomes(asked + [made] + results + [{"role": "assistant", "content": "ok"}]) == []
    assert new_tool_outcomes(asked + [{"role": "tool", "tool_call_id": "c1", "content": "x"}]) == []
    assert new_tool_outcomes(asked + [made, {"role": "tool", "tool_call_id": "zz", "content": "x"}]) == []
    assert new_tool_outcomes("garbage") == [] and new_tool_outcomes([]) == []
    for said, err in [("Error: boom", True), ("  error - no such city", True), ("Traceback (most recent", True),
                      ('{"error": "rate limited"}', True), ('{"error": null, "ok": 1}', False),
                      ("Errors are rare here: 18C", False), ("18C and sunny", False), ("{not json", False),
                      ([{"type": "text", "text": "Exception: x"}], True), (None, False)]:
        assert reports_error(said) is err, said
