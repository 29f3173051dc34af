"""The tool registry and the built-in tools, without a server (fast).

Pins: schemas come from type hints and docstrings; arguments are validated
before the call and every failure (bad JSON, unknown tool, invalid or
unexpected arguments, an exception, a timeout) is a tool result, never an
exception; one turn's calls run concurrently and come back in order with
their ids, through both the registry and its LangChain tools; the calculator
refuses anything but arithmetic and bounds sizes; file search never reads
outside its folders.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from agentloop.tools import FileSearch, PathOutsideRoots, ToolRegistry, builtin_registry, evaluate
from agentloop.tools.builtin import convert_time, convert_units, current_time
from tests.conftest import ROOT


BOOKED: list[str] = []  # book_flight's calls, so tests can tell whether it ran


def book_flight(origin: str, destination: str, passengers: int = 1, cabin: Literal["economy", "business"] = "economy",
                flexible: bool | None = None) -> dict:
    """Book a flight between two airports.

    Args:
        origin: IATA code of the departure airport, e.g. CDG
        destination: IATA code of the arrival airport
        passengers: how many people travel
        cabin: the cabin class
        flexible: whether the dates may move
    """
    BOOKED.append(origin)
    return {"from": origin, "to": destination, "passengers": passengers, "cabin": cabin}


def call(cid: str, name: str, args) -> dict:
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


@pytest.fixture
def reg() -> ToolRegistry:
    r = ToolRegistry(default_timeout=0.5)
    r.register(book_flight)
    return r


# ---------------------------------------------------------------- schema and validation

def test_schema_from_type_hints_and_docstring(reg):
    (spec,) = reg.openai_tools()
    fn = spec["function"]
    assert spec["type"] == "function" and fn["name"] == "book_flight"
    assert fn["description"] == "Book a flight between two airports."
    props = fn["parameters"]["properties"]
    assert fn["parameters"]["required"] == ["origin", "destination"]
    assert props["origin"] == {"type": "string", "description": "IATA code of the departure airport, e.g. CDG"}
    assert props["passengers"]["type"] == "integer" and props["passengers"]["default"] == 1
    assert props["cabin"]["enum"] == ["economy", "business"]
    assert {"type": "boolean"} in props["flexible"]["anyOf"]
    assert not any("title" in p for p in props.values())  # no pydantic noise in what the model reads
    # The LangChain tool describes exactly the same function.
    (lc,) = reg.langchain_tools()
    assert convert_to_openai_tool(lc) == spec


def test_a_tool_needs_a_description():
    def nodoc(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="docstring"):
        ToolRegistry().register(nodoc)
    r = ToolRegistry()
    r.register(nodoc, description="Echo a number.")
    with pytest.raises(ValueError, match="already registered"):
        r.register(nodoc, description="again")


def test_valid_call_is_validated_and_coerced(reg):
    r = reg.run("book_flight", '{"origin": "CDG", "destination": "JFK", "passengers": "2"}', "c1")
    assert r.ok and r.error is None and r.tool_call_id == "c1"
    assert json.loads(r.content) == {"from": "CDG", "to": "JFK", "passengers": 2, "cabin": "economy"}
    assert r.message() == {"role": "tool", "tool_call_id": "c1", "name": "book_flight", "content": r.content}


@pytest.mark.parametrize("args, kind, words", [
    ('{"origin": "CDG"', "bad_json", "not valid JSON"),
    ("[1, 2]", "invalid_arguments", "must be a JSON object"),
    ({"origin": "CDG"}, "invalid_arguments", "destination: Field required"),
    ({"origin": "CDG", "destination": "JFK", "passengers": "many"}, "invalid_arguments", "passengers"),
    ({"origin": "CDG", "destination": "JFK", "cabin": "first"}, "invalid_arguments", "cabin"),
    ({"origin": "CDG", "destination": "JFK", "seats": 2}, "invalid_arguments", "unexpected argument(s) seats"),
])
def test_invalid_arguments_become_tool_results(reg, args, kind, words):
    BOOKED.clear()
    r = reg.run("book_flight", args, "c9")
    assert not r.ok and r.error == kind and r.tool_call_id == "c9"
    assert r.content.startswith("Error: ") and words in r.content
    assert not BOOKED  # validated before the call: the function never ran
    assert reg.run("book_flight", {"origin": "A", "destination": "B"}).ok and len(BOOKED) == 1


def test_unknown_tool_is_a_result_naming_the_real_ones(reg):
    r = reg.run("fly", {}, "c2")
    assert r.error == "unknown_tool" and "book_flight" in r.content


def test_exceptions_and_timeouts_become_results():
    reg = ToolRegistry(default_timeout=0.3)

    @reg.register
    def explode(city: str) -> str:
        """Always fails.

        Args:
            city: any city
        """
        raise RuntimeError(f"weather service for {city} is down")

    @reg.register
    def hang(seconds: float) -> str:
        """Sleeps.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke up"

    @reg.register
    async def ahang(seconds: float) -> str:
        """Sleeps, asynchronously.

        Args:
            seconds: how long
        """
        await asyncio.sleep(seconds)
        return "woke up"

    r = reg.run("explode", {"city": "Paris"}, "a")
    assert r.error == "exception" and "RuntimeError: weather service for Paris is down" in r.content
    for name in ("hang", "ahang"):
        t0 = time.monotonic()
        r = reg.run(name, {"seconds": 5}, "b")
        assert r.error == "timeout" and "timed out after 0.3 s" in r.content
        assert time.monotonic() - t0 < 1.5  # the caller is not held by the stuck tool
        assert reg.run(name, {"seconds": 0.01}).content == "woke up"
    # The same through the async path.
    res = asyncio.run(reg.aexecute([call("x", "hang", {"seconds": 5}), call("y", "explode", {"city": "Oslo"}),
                                    call("z", "ahang", {"seconds": 0})]))
    assert [(r.tool_call_id, r.error) for r in res] == [("x", "timeout"), ("y", "exception"), ("z", None)]


def _sleepy_registry(spans: list) -> ToolRegistry:
    reg = ToolRegistry(default_timeout=5)

    @reg.register
    def get_weather(city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: The city name, e.g. Paris
        """
        t0 = time.monotonic()
        time.sleep(0.5)
        spans.append((city, t0, time.monotonic()))
        return {"city": city, "temperature": 18}

    @reg.register
    async def get_time(city: str) -> str:
        """Get the local time in a city.

        Args:
            city: The city name
        """
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        spans.append((city, t0, time.monotonic()))
        return f"noon in {city}"

    return reg


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_turns_calls_run_concurrently_in_order(mode):
    spans: list = []
    reg = _sleepy_registry(spans)
    calls = [call("call_1", "get_weather", {"city": "Paris"}), call("call_2", "get_time", {"city": "London"}),
             call("call_3", "get_weather", {"city": "Rome"})]
    t0 = time.monotonic()
    res = reg.execute(calls) if mode == "sync" else asyncio.run(reg.aexecute(calls))
    took = time.monotonic() - t0
    assert took < 0.9, f"three 0.5 s tools took {took:.2f} s: not concurrent"
    assert [r.tool_call_id for r in res] == ["call_1", "call_2", "call_3"]
    assert [r.content for r in res] == ['{"city": "Paris", "temperature": 18}', "noon in London",
                                        '{"city": "Rome", "temperature": 18}']
    assert max(s for _, s, _ in spans) < min(e for _, _, e in spans)  # all started before any ended


def test_langchain_tools_share_validation_and_errors(reg):
    (lc,) = reg.langchain_tools()
    ok = lc.invoke({"name": "book_flight", "args": {"origin": "CDG", "destination": "NRT"}, "id": "t1",
                    "type": "tool_call"})
    assert isinstance(ok, ToolMessage) and ok.status == "success" and ok.tool_call_id == "t1"
    assert json.loads(ok.content)["to"] == "NRT"
    bad = lc.invoke({"name": "book_flight", "args": {"origin": 7}, "id": "t2", "type": "tool_call"})
    assert bad.status == "error" and bad.tool_call_id == "t2"
    assert bad.content == reg.run("book_flight", {"origin": 7}).content  # one validation path
    extra = lc.invoke({"name": "book_flight", "args": {"origin": "A", "destination": "B", "x": 1}, "id": "t3",
                       "type": "tool_call"})
    assert extra.status == "error" and "unexpected argument(s) x" in extra.content


def test_results_are_bounded():
    reg = ToolRegistry()

    @reg.register
    def big() -> str:
        """Returns a lot of text."""
        return "x" * 50_000

    r = reg.run("big", {})
    assert r.ok and len(r.content) < 20_100 and "[truncated: 30000 more characters]" in r.content


# ---------------------------------------------------------------- calculator

@pytest.mark.parametrize("expr, value", [
    ("12*7", 84), ("2*(3+4)", 14), ("-3 + +2", -1), ("7/2", 3.5), ("12/4", 3), ("7//2", 3), ("7 % 3", 1),
    ("2**10", 1024), ("2^10", 1024), ("3 × 4 ÷ 2", 6), ("0.1 + 0.2", 0.1 + 0.2), ("1e3 * 2", 2000),
    ("9**999 % 10", 9), ("(-8) ** 2", 64),
])
def test_calculator_arithmetic(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr, words", [
    ("__import__('os').system('echo pwned')", "function call"),
    ("().__class__.__bases__[0].__subclasses__()", "function call"),
    ("().__class__", "attribute access"),
    ("os.system", "attribute access"),
    ("x + 1", "the name 'x'"),
    ("True + 1", "only numbers"),
    ("'a' * 10", "only numbers"),
    ("1j * 2", "only numbers"),
    ("[1] * 10", "'List'"),
    ("lambda: 1", "'Lambda'"),
    ("2 ** 100000", "exponent 100000 is too large"),
    ("9 ** 9 ** 9", "too large"),
    ("10 ** 999 * 10 ** 999", "too large"),
    ("(10 ** 300) ** 100", "too large"),
    ("1e308 * 10", "not a finite number"),
    ("10.0 ** 400", "too large"),
    ("1 / 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("1 < 2", "'Compare'"),
    ("+".join(["1"] * 200), "longer than 256"),
    ("-" * 200 + "1", "more than 128 parts"),
    ("", "empty"),
])
def test_calculator_refuses_everything_else(expr, words):
    with pytest.raises(ValueError) as e:
        evaluate(expr)
    assert words in str(e.value)


def test_calculator_errors_reach_the_model_as_results():
    reg = builtin_registry()
    r = reg.run("calculator", {"expression": "__import__('os')"}, "c")
    assert r.error == "exception" and "not allowed" in r.content
    assert reg.run("calculator", {"expression": "12*7"}).content == "84"


# ---------------------------------------------------------------- date, time, units

def test_current_time_in_a_zone():
    got = current_time("Asia/Tokyo")
    dt = datetime.fromisoformat(got["datetime"])
    assert got["timezone"] == "Asia/Tokyo" and got["utc_offset"] == "+0900"
    assert abs((dt - datetime.now(ZoneInfo("UTC"))).total_seconds()) < 5
    assert current_time()["utc_offset"] == "+0000"


def test_convert_time_across_zones_and_dst():
    assert convert_time("2024-07-01T12:00", "Asia/Tokyo")["datetime"] == "2024-07-01T21:00:00+09:00"
    # Paris is UTC+2 in summer, UTC+1 in winter; New York -4 / -5.
    assert convert_time("2024-07-01T12:00", "America/New_York", "Europe/Paris")["datetime"] == \
        "2024-07-01T06:00:00-04:00"
    assert convert_time("2024-01-15T12:00", "America/New_York", "Europe/Paris")["datetime"] == \
        "2024-01-15T06:00:00-05:00"
    assert convert_time("2024-01-15T12:00+05:30", "UTC")["time"] == "06:30:00"  # the offset in the text wins


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../../etc/passwd", "/etc/localtime", ""])
def test_unknown_zones_are_refused(zone):
    with pytest.raises(ValueError, match="unknown time zone"):
        current_time(zone)


@pytest.mark.parametrize("value, a, b, expected", [
    (10, "km", "mi", 6.2137119224), (212, "F", "C", 100.0), (0, "celsius", "kelvin", 273.15),
    (1, "kg", "lb", 2.2046226218), (1, "GB", "MiB", 953.6743164063), (90, "min", "h", 1.5),
    (100, "km/h", "mph", 62.1371192237), (1, "gallon", "l", 3.785411784), (-40, "degrees Fahrenheit", "C", -40.0),
])
def test_unit_conversion(value, a, b, expected):
    got = convert_units(value, a, b)
    assert got["result"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("a, b, words", [("km", "kg", "cannot convert length"), ("parsec", "m", "unknown unit"),
                                         ("K", "C", "below absolute zero")])
def test_unit_conversion_errors(a, b, words):
    with pytest.raises(ValueError, match=words):
        convert_units(-1 if words.startswith("below") else 1, a, b)


# ---------------------------------------------------------------- file search confinement

@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "kb", tmp_path / "outside"
    (root / "docs").mkdir(parents=True)
    outside.mkdir()
    (root / "docs" / "refunds.md").write_text("# Refunds\nRefund policy: 30 days.\nShipping is free.\n")
    (root / "faq.txt").write_text("How do I ask for a refund? Write to us.\n")
    (root / "image.txt").write_bytes(b"refund\x00\x01binary")
    (outside / "secret.txt").write_text("refund policy SECRET: the admin password\n")
    (root / "leak.txt").symlink_to(outside / "secret.txt")       # a file link pointing out
    (root / "docs" / "escape").symlink_to(outside, target_is_directory=True)  # a folder link pointing out
    (root / "inside-link.md").symlink_to(root / "faq.txt")         # a link that stays inside is fine
    return root, outside


def test_search_finds_and_ranks_inside_the_root(tree):
    root, _ = tree
    fs = FileSearch([root])
    got = fs.search_files("refund policy", max_results=10)
    paths = [m["path"] for m in got["matches"]]
    assert got["matches"][0] == {"path": "kb/docs/refunds.md", "line": 2, "text": "Refund policy: 30 days."}
    assert "kb/faq.txt" in paths
    assert not any("SECRET" in m["text"] for m in got["matches"])  # nothing from outside, via either link
    assert all(not p.endswith("image.txt") for p in paths)        # binary skipped
    assert fs.search_files("shipping", folder="docs")["matches"][0]["path"] == "kb/docs/refunds.md"
    assert fs.search_files("refund", folder="kb/docs")["matches"][0]["path"] == "kb/docs/refunds.md"


@pytest.mark.parametrize("folder", ["..", "../outside", "docs/../../outside", "kb/../outside", "/etc", "~",
                                    "docs/escape", "C:/Windows"])
def test_search_refuses_paths_that_leave_the_root(tree, folder):
    fs = FileSearch([tree[0]])
    with pytest.raises(PathOutsideRoots):
        fs.search_files("refund", folder=folder)


def test_read_is_confined_too(tree):
    root, outside = tree
    fs = FileSearch([root])
    assert fs.read_text_file("kb/docs/refunds.md").startswith("# Refunds")
    assert fs.read_text_file("inside-link.md").startswith("How do I ask")
    for bad in ("leak.txt", "docs/escape/secret.txt", "../outside/secret.txt", str(outside / "secret.txt")):
        with pytest.raises(ValueError):  # PathOutsideRoots is a ValueError too
            fs.read_text_file(bad)


def test_symlinked_root_is_resolved_once(tree, tmp_path):
    root, _ = tree
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    fs = FileSearch([alias])
    assert fs.roots == [root.resolve()]
    assert fs.search_files("shipping")["matches"][0]["path"] == "kb/docs/refunds.md"


def test_several_roots_are_labelled(tree, tmp_path):
    root, _ = tree
    other = tmp_path / "notes"
    other.mkdir()
    (other / "n.txt").write_text("a refund note\n")
    fs = FileSearch([root, other])
    paths = {m["path"] for m in fs.search_files("refund", max_results=20)["matches"]}
    assert "notes/n.txt" in paths and "kb/faq.txt" in paths
    with pytest.raises(PathOutsideRoots, match="not in a search folder"):
        fs.search_files("refund", folder="elsewhere")


def test_file_tools_through_the_registry(tree):
    root, _ = tree
    reg = builtin_registry([root])
    assert {"calculator", "current_time", "convert_time", "convert_units", "search_files",
            "read_text_file"} == set(reg.names())
    params = next(t for t in reg.openai_tools() if t["function"]["name"] == "search_files")["function"]["parameters"]
    assert set(params["properties"]) == {"query", "folder", "max_results"}  # a bound method: no "self"
    r = reg.run("search_files", {"query": "refund", "folder": "../outside"}, "s1")
    assert r.error == "exception" and "not allowed" in r.content and "SECRET" not in r.content
    r = reg.run("read_text_file", {"path": "leak.txt"}, "s2")
    assert not r.ok and "SECRET" not in r.content
    assert os.path.exists(root / "leak.txt")  # the link is there; it is just never followed out


def test_tools_and_agents_never_import_fastapi():
    """Client-side code: it must run where the gateway's server stack is not installed or wanted."""
    code = ("import sys, tools, agents.agent, agents.chatbot, agents.cli_chat; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'serve') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
