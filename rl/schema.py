"""The records the gateway logs and the loop learns from: their names, and what the loop
needs from whatever stores them.

Shared vocabulary of serving and training, kept below both: the gateway's store
(agentloop.serve.store) writes these records and implements `LoopStore`; the
loop (rl/loop.py, rl/datasets.py) reads and writes them through that interface
only, so the trainer never depends on the HTTP gateway and any store that keeps
these methods' contract can stand in (a SQLite file, PostgreSQL, a test double
subclassing the real store).

Invariant: pure declarations and functions; no I/O, no imports beyond the stdlib.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Protocol

# Feedback a caller can give on a completion (serve/services/feedback.py checks the bodies).
# "reference" means "grade against this" (rl/graders), never "train on this verbatim".
FEEDBACK_TYPES = ("thumbs", "rating", "correction", "pairwise", "reference")



def conversation_hash(request: dict[str, Any]) -> str:
    """Stable hash of what was asked (messages and tools): the log keeps it with each
    completion; pairwise feedback, dedupe and the held-out split group by it."""
    key = json.dumps({"messages": request.get("messages"), "tools": request.get("tools")},
                     sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()


# A training run's life: queued -> running -> promoted | passed | rejected | failed.
RUN_STATUSES = ("queued", "running", "promoted", "passed", "rejected", "failed")
# At most one run is in one of these at a time (the store enforces it).
ACTIVE_RUN_STATUSES = ("queued", "running")


class LoopStore(Protocol):
    """What one learning-loop iteration reads and writes."""

    def iter_feedback_with_completions(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Feedback rows joined with the completions they are about (rl/datasets.py)."""

    def untrusted_callers(self) -> list[str]:
        """Callers (API keys) whose feedback is stored but never trained on."""

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Record a run's new status, dataset, gate, result or reason; returns the run."""

    def add_run_metrics(self, run_id: str, step: int, metrics: dict[str, Any]) -> None:
        """Append one training step's logged metrics to a run."""
