"""Graders: what the loop can check about an answer without a person typing feedback.

A grader takes a logged request, one candidate assistant message and an optional reference
message, and returns a score in [0, 1] with a reason (`base.py`: `Case`, `Grader`, `Grade`,
`grade_all`). Built in:
- `tool_schema` (calls.py): the calls name the request's tools and validate against their schemas;
- `reference_call` (calls.py): the calls match the reference's, BFCL-style;
- `string_check` (text.py): the text equals / contains a value or the reference's text;
- `regex` (text.py): the text matches a pattern;
- `python` (python.py): a function the deployment names (`module:function`), in a worker process,
  with a timeout;
- `judge` (judge.py): an OpenAI-compatible model scores the answer 0..10 (a prompt template in
  templates/), by default the deployment's own engine and live version; with `mode: "rank"` it
  scores several answers to one request together, relative to each other (`grade_group`).
Beside them, `outcomes.py`: a tool's result sent back in the next request grades the call that
produced it (`tool_outcome`: 0 when the result reports an error, else 1), with no grader to set up.

A deployment configures its graders as a list of specs, `{"type": ..., "name"?: ..., <options>}`
(the `graders` setting, `AGENTLOOP_GRADERS` as JSON, or the file `graders_file` names);
`build_graders` checks every spec (an
unknown type or key, a bad option, two graders with one name: GraderConfigError) and builds
them in order. Without a setting, `DEFAULT_SPECS`: the schema check, the reference-call match
and `reference_text` (the text equals the reference's).
"""

from __future__ import annotations

from typing import Any

from agentloop.rl.graders.base import (
    GRADE_STATUSES, Case, Grade, Grader, GraderConfigError, GraderSet, grade_all, grade_group,
)
from agentloop.rl.graders.calls import ReferenceCallGrader, ToolSchemaGrader, normalize_string, same_value
from agentloop.rl.graders.judge import JudgeGrader, Served
from agentloop.rl.graders.outcomes import ToolOutcome, new_tool_outcomes, reports_error
from agentloop.rl.graders.python import PythonGrader
from agentloop.rl.graders.text import RegexGrader, StringCheckGrader

__all__ = [
    "BUILT_IN", "DEFAULT_SPECS", "GRADE_STATUSES", "Case", "Grade", "Grader", "GraderConfigError", "GraderSet",
    "ToolOutcome", "build_graders", "grade_all", "grade_group", "new_tool_outcomes", "normalize_string", "reports_error",
    "same_value",
]

BUILT_IN: dict[str, type[Grader]] = {g.type: g for g in (ToolSchemaGrader, ReferenceCallGrader,
                                                         StringCheckGrader, RegexGrader, PythonGrader, JudgeGrader)}
DEFAULT_SPECS: list[dict[str, Any]] = [
    {"type": "tool_schema"},
    {"type": "reference_call"},
    {"type": "string_check", "name": "reference_text", "operation": "eq"},
]
MAX_NAME_CHARS = 64


def build_graders(specs: list[dict[str, Any]] | None = None, *, served: Served | None = None) -> GraderSet:
    """The graders `specs` describe (None: DEFAULT_SPECS). `served` tells a judge without a
    `base_url` where the deployment's live version answers. Raises GraderConfigError."""
    if specs is None:
        specs = DEFAULT_SPECS
    if not isinstance(specs, list):
        raise GraderConfigError("graders must be a list of grader specs")
    out: list[Grader] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise GraderConfigError(f"graders[{i}] must be an object with a 'type'")
        kind = spec.get("type")
        cls = BUILT_IN.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise GraderConfigError(f"graders[{i}].type must be one of {', '.join(BUILT_IN)}; got {kind!r}")
        unknown = spec.keys() - {"type", "name"} - cls.fields
        if unknown:
            raise GraderConfigError(f"graders[{i}] ({kind}) has no option {sorted(unknown)[0]!r}")
        name = spec.get("name", kind)
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise GraderConfigError(f"graders[{i}].name must be a string of 1..{MAX_NAME_CHARS} characters")
        if any(g.name == name for g in out):
            raise GraderConfigError(f"graders[{i}]: two graders are named {name!r}")
        try:
            extra = {"served": served} if cls is JudgeGrader else {}
            out.append(cls(name, **{k: v for k, v in spec.items() if k in cls.fields}, **extra))
        except GraderConfigError as e:
            raise GraderConfigError(f"graders[{i}] ({name}): {e}") from None
    return GraderSet(out)
