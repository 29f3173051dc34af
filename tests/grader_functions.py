"""Grading functions the python grader tests name (`tests.grader_functions:<name>`)."""

from __future__ import annotations

import json
import time


def city_is_paris(request, candidate, reference):
    calls = candidate.get("tool_calls") or []
    city = json.loads(calls[0]["function"]["arguments"]).get("city") if calls else None
    return (1.0, "asks for Paris") if city == "Paris" else (0.0, f"asks for {city!r}")


def against_reference(request, candidate, reference):
    same = reference is not None and candidate.get("content") == reference.get("content")
    return {"score": float(same), "reason": "same text" if same else "other text"}


def chatty(request, candidate, reference):
    print("grading now")  # must not disturb the protocol
    return 0.25


def raises(request, candidate, reference):
    raise ValueError("no good")


def hangs(request, candidate, reference):
    time.sleep(60)
    return 1.0


def garbage(request, candidate, reference):
    return "high"
