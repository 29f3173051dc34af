"""Grading logged completions: `POST /admin/grade`, every reference feedback as it arrives, and the
outcomes of tool calls that the next request reports.

What it owns: turning a logged completion (its request and choice 0), and a reference (given in
the call, else the newest reference feedback on that completion) into a `Case`, running the
deployment's graders on it (rl/graders) and storing each grade with its grader, the grader's
version, the score and the reason (serve/store/grades.py).

Invariants
- A grader that fails (raises, returns garbage) is a stored grade with status "failed" and its
  reason; the other graders' grades stand, and nothing else is lost.
- Blocking (SQL, graders): callers on the event loop use a thread.
- An admin grades any caller's completion; a reference feedback grades only its own caller's
  completion (feedback ownership is checked before it is stored); a tool outcome only a completion
  of the caller who sent it, once however often the conversation repeats it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable

from agentloop.rl.graders import Case, Grade, GraderSet, new_tool_outcomes
from agentloop.rl.schema import conversation_hash
from agentloop.serve.errors import InvalidRequest, NotFound
from agentloop.serve.services.feedback import MAX_ID_CHARS, check_assistant_message, completions_by_id

log = logging.getLogger("agentloop.grading")


class Grading:
    def __init__(self, store, graders: GraderSet, *, flush: Callable[[], Any] | None = None):
        self.store = store
        self.graders = graders
        self.flush = flush  # the request log's (LogWriter.flush): a completion may not be written yet

    def describe(self) -> list[dict[str, Any]]:
        return self.graders.describe()

    def grade(self, completion_id: Any, reference: Any = None, *, feedback: dict | None = None) -> dict[str, Any]:
        """Grade choice 0 of `completion_id` with every grader that applies; store and return the grades.

        `reference` (an assistant message) is what to grade against; without one, the newest
        reference feedback on the completion is (`feedback` names it when the caller has it).
        Raises InvalidRequest, NotFound.
        """
        if not isinstance(completion_id, str) or not completion_id or len(completion_id) > MAX_ID_CHARS:
            raise InvalidRequest("'completion_id' must be a completion id (a non-empty string).", param="completion_id")
        comp = completions_by_id(self.store, self.flush, [completion_id])[completion_id]
        if comp is None:
            raise NotFound(f"No completion found with id '{completion_id}'.", param="completion_id",
                           code="completion_not_found")
        choices = (comp.get("response") or {}).get("choices") or []
        candidate = next((c.get("message") for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if comp["status_code"] != 200 or not isinstance(candidate, dict):
            raise InvalidRequest(f"Completion '{completion_id}' has no successful answer to grade.",
                                 param="completion_id", code="completion_not_successful")
        if reference is not None:
            reference = check_assistant_message(reference, param="reference")
        else:
            if feedback is None:
                newest = self.store.list_feedback(type="reference", completion_id=completion_id, limit=1)
                feedback = newest[0] if newest else None
            reference = feedback["reference"] if feedback else None
        case = Case(request=comp.get("request") or {}, candidate=candidate, reference=reference)
        grades = self.graders.grade(case)
        self.store.insert_grades([_row(g, comp, feedback_id=feedback["id"] if feedback else None,
                                       reference=reference) for g in grades])
        return {"object": "grade_list", "completion_id": completion_id, "version": comp.get("version"),
                "reference": reference, "data": [g.to_dict() for g in grades]}

    def grade_reference_feedback(self, row: dict[str, Any]) -> None:
        """Grade the completion a just-stored reference feedback is about (never raises)."""
        try:
            self.grade(row["completion_id"], feedback=row)
        except Exception:  # noqa: BLE001 - the feedback is committed; grading it is a bonus
            log.exception("grading reference feedback %s failed", row.get("id"))

    def record_tool_outcomes(self, caller: str, request: dict[str, Any]) -> int:
        """Grade the calls whose results `request` brings back (`tool_outcome`, rl/graders/outcomes.py)
        on the completion of `caller` that made them; returns how many grades are new. Never raises:
        it runs beside a chat request, which it must not disturb."""
        try:
            outcomes = new_tool_outcomes(request.get("messages"))
            if not outcomes:
                return 0
            # The messages before the calling assistant message, with the same tools, were the
            # request of the completion that made the calls.
            h = conversation_hash({"messages": outcomes[0].prefix, "tools": request.get("tools")})
            comp = self._maker(caller, h, {o.tool_call_id for o in outcomes})
            if comp is None and self.flush is not None:
                self.flush()  # it may still be on its way to the log
                comp = self._maker(caller, h, {o.tool_call_id for o in outcomes})
            if comp is None:
                return 0
            # Its id makes an outcome one grade however often the conversation repeats it.
            rows = [_row(o.grade(), comp, id="grade-outcome-" + hashlib.sha256(
                f"{comp['id']}\0{o.tool_call_id}".encode()).hexdigest()[:32]) for o in outcomes]
            return len(self.store.insert_grades(rows))
        except Exception:  # noqa: BLE001 - an outcome not recorded must not fail the chat
            log.exception("recording tool outcomes failed")
            return 0

    def _maker(self, caller: str, h: str, ids: set[str]) -> dict[str, Any] | None:
        """The completion of conversation `h` whose answer made the calls `ids`."""
        for comp in self.store.completions_of_conversation(caller, h):
            for choice in (comp.get("response") or {}).get("choices") or []:
                msg = choice.get("message") if isinstance(choice, dict) else None
                made = {tc.get("id") for tc in (msg or {}).get("tool_calls") or [] if isinstance(tc, dict)}
                if ids & made:
                    return comp
        return None


def _row(g: Grade, comp: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The stored row of grade `g` on choice 0 of the logged completion `comp`."""
    return {"completion_id": comp["id"], "choice_index": 0, "version": comp.get("version"), "grader": g.grader,
            "grader_type": g.type, "grader_version": g.version, "score": g.score, "status": g.status,
            "reason": g.reason, **extra}
