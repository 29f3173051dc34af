"""A grader the deployment writes in Python: `{"type": "python", "function": "module:function"}`.

The function is called as `function(request, candidate, reference)` (dicts as logged; reference
may be None) and returns a score in [0, 1], a `(score, reason)` pair or `{"score", "reason"}`.

It runs in a worker process of its own (`main` below, started on first use, in the gateway's
working directory, which is on its `sys.path`), one call at
a time, with a `timeout` (seconds, default 5): a function that hangs is killed with its process,
the grade is failed with the reason, and the next call starts a new worker. A function that raises
or returns something else is a failed grade too; nothing it does reaches the gateway's process
(what it prints goes to the worker's stderr, never into the protocol). The worker speaks one JSON
object per line on stdin/stdout.

At build time only the spec is checked (`module:function` spelled right, the module found without
running it); a module that fails to import, or lacks the function, fails the first grade saying so.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
from typing import Any

from agentloop.rl.graders.base import Case, Grader, GraderConfigError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_TIMEOUT = 300.0
# The worker's command (`-c`, not `-m`: this module is imported with its package first). With
# `-c`, the working directory is on sys.path, so the deployment's own modules import.
_WORKER = "import sys; from agentloop.rl.graders.python import main; sys.exit(main(sys.argv[1:]))"


def load_function(spec: str):
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise AttributeError(f"{module} has no function {name!r}")
    return fn


def as_score(result: Any) -> tuple[Any, str]:
    """A grading function's result as (score, reason); the score is checked by grade_all."""
    if isinstance(result, dict):
        return result.get("score"), str(result.get("reason") or "")
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return result[0], str(result[1])
    return result, ""


class PythonGrader(Grader):
    type = "python"
    fields = frozenset({"function", "timeout"})

    def __init__(self, name: str | None = None, *, function: str | None = None, timeout: float = 5.0):
        super().__init__(name)
        if not isinstance(function, str) or not _SPEC.match(function):
            raise GraderConfigError(f"python 'function' must be 'module:function'; got {function!r}")
        try:
            found = importlib.util.find_spec(function.partition(":")[0])
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise GraderConfigError(f"python: no module {function.partition(':')[0]!r} on the path")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
            raise GraderConfigError(f"python 'timeout' must be seconds in (0, {MAX_TIMEOUT:.0f}]")
        self.function, self.timeout = function, float(timeout)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def options(self) -> dict[str, Any]:
        return {"function": self.function, "timeout": self.timeout}

    def applies(self, case: Case) -> bool:
        return True

    def score(self, case: Case) -> tuple[float, str]:
        line = json.dumps({"request": case.request, "candidate": case.candidate, "reference": case.reference})
        with self._lock:
            proc = self._worker()
            try:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
                answer = proc.stdout.readline() if ready else None
            except (BrokenPipeError, OSError):
                answer = ""
            if answer is None:
                self._stop()
                raise TimeoutError(f"{self.function} did not answer within {self.timeout:g}s (stopped)")
            if not answer:
                self._stop()
                raise RuntimeError(f"the worker of {self.function} exited")
        out = json.loads(answer)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out["score"], out["reason"]

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER, self.function],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1,
                cwd=os.getcwd())
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


def main(argv: list[str]) -> int:
    """The worker: one JSON case per line in, one JSON answer per line out."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # what the function prints must not reach the protocol
    try:
        fn = load_function(argv[0])
    except Exception as e:  # noqa: BLE001 - said on every call: the grade records it
        fn, failure = None, f"cannot load {argv[0]}: {type(e).__name__}: {e}"
    for line in sys.stdin:
        try:
            if fn is None:
                raise RuntimeError(failure)
            case = json.loads(line)
            score, reason = as_score(fn(case["request"], case["candidate"], case["reference"]))
            json.dumps(score)  # the score must travel; grade_all checks its range
            answer = {"score": score, "reason": reason[:1000]}
        except Exception as e:  # noqa: BLE001 - the function's failure is its grade
            answer = {"error": f"{type(e).__name__}: {e}"[:1000]}
        out.write(json.dumps(answer, default=repr) + "\n")
    return 0
