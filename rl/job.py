"""A training run as its own process: `python -m agentloop.rl.job <spec.json | ->`, reporting JSON lines on stdout.

Owns: the job spec, the event stream, and the rule that a run touches the
registry exactly once, at the end, through `AdapterRegistry.commit`.

Spec (JSON object):
    method        "dpo" | "kto"
    registry      the adapter registry root, e.g. <home>/adapters/<model-slug>
    base_model    local model folder
    dataset       JSONL file of rows (rl/dpo.py, rl/kto.py describe them; rl/datasets.py
                  writes them); each row's "id" / "feedback_ids" become the
                  manifest's dataset_ids
    eval_dataset  optional JSONL of held-out rows (eval_* metrics)
    parent        a version ("v0003"), "live", or null for a fresh LoRA on the base
    config        DPOJobConfig / KTOJobConfig fields (not base_model/output_dir/
                  init_adapter/template/max_rank: the spec sets those)
    template      chat template name (default "chatml-tools")
    max_rank      engine's max LoRA rank (default 16)
    dataset_ids   optional, overrides the ids taken from the rows
    reason        optional text for the new version's manifest
    gate          optional {"rows": JSONL of held-out DPO pairs, "live": adapter folder or null
                  (the base)}: after training, while the model is loaded, the job scores
                  the pairs under the live adapter and the candidate (rl/gate.py
                  `score_loaded`) and reports them as result["gate_preference"]
Events, one JSON object per line on stdout:
    {"event": "start", "pid", "method", "parent", "examples"}
    {"event": "step", "step", "metrics": {...}, "elapsed"}
    {"event": "done", "version", "manifest": {...}, "result": {...}}
    {"event": "failed", "error": "..."}          (exit code 1, or 128+signal)

Invariant: the adapter is trained into a `.tmp-train-<host>-<pid>-*` folder
inside the registry root and committed only after training succeeded and
validated; a failed, terminated or SIGKILLed run leaves no version (only a
temp folder that `list()` ignores and `gc()` removes once this pid is gone).
Everything libraries print goes to stderr; stdout carries only events.
A job started by `start_job` is SIGTERMed when its starter dies (Linux), so a
gateway killed mid-run leaves no orphan training beside the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from agentloop.rl.registry import DEFAULT_MAX_RANK, AdapterRegistry

__all__ = ["start_job", "read_events", "run_spec", "load_rows", "main", "JobTerminated"]

ROOT = Path(__file__).resolve().parents[1]
_SPEC_OWNED = ("base_model", "output_dir", "init_adapter", "template", "max_rank")
Emit = Callable[[dict], None]


class JobTerminated(BaseException):
    """SIGTERM/SIGINT: unwinds the run through its cleanup like an error."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def load_rows(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return rows


def _method(name: str):
    if name == "dpo":
        from agentloop.rl.dpo import DPOJobConfig, train_dpo

        return DPOJobConfig, train_dpo
    if name == "kto":
        from agentloop.rl.kto import KTOJobConfig, train_kto

        return KTOJobConfig, train_kto
    raise ValueError(f"unknown method {name!r}; use 'dpo' or 'kto'")


def run_spec(spec: dict, emit: Emit) -> dict:
    """Train per `spec`, commit to the registry, return the manifest dict. Raises on any failure."""
    for key in ("method", "registry", "base_model", "dataset"):
        if not spec.get(key):
            raise ValueError(f"spec is missing {key!r}")
    config_cls, train = _method(spec["method"])
    overrides = dict(spec.get("config") or {})
    clash = [k for k in _SPEC_OWNED if k in overrides]
    if clash:
        raise ValueError(f"config must not set {clash}: the spec's own fields decide them")
    max_rank = int(spec.get("max_rank", DEFAULT_MAX_RANK))
    template = spec.get("template", "chatml-tools")
    registry = AdapterRegistry(spec["registry"], max_rank=max_rank)
    registry.gc()

    parent = spec.get("parent")
    if parent == "live":
        live = registry.live()
        if live is None:
            raise ValueError(f"parent 'live' but registry {registry.root} has no live version")
        parent = live.version
    init_adapter = None
    if parent is not None:
        parent = registry.verify(parent).version  # never continue from a tampered or broken adapter
        init_adapter = str(registry.path(parent))

    rows = load_rows(spec["dataset"])
    eval_rows = load_rows(spec["eval_dataset"]) if spec.get("eval_dataset") else None
    dataset_ids = spec.get("dataset_ids")
    if dataset_ids is None:
        # A row's "id", or the "feedback_ids" rl/datasets.py attaches: what this version learned from.
        seen: dict = {}
        for r in rows:
            for i in ([r["id"]] if "id" in r else []) + list(r.get("feedback_ids") or []):
                seen.setdefault(json.dumps(i), i)
        dataset_ids = list(seen.values())

    gate = spec.get("gate")
    after_train = _gate_scorer(gate, template) if gate else None
    work = registry.make_temp_dir("train")
    try:
        cfg = config_cls.from_dict({**overrides, "base_model": spec["base_model"], "output_dir": str(work / "adapter"),
                                    "init_adapter": init_adapter, "template": template, "max_rank": max_rank})
        emit({"event": "start", "pid": os.getpid(), "method": spec["method"], "parent": parent,
              "examples": len(rows)})
        t0 = time.monotonic()
        result = train(cfg, rows, eval_rows,
                       on_log=lambda step, m: emit({"event": "step", "step": step, "metrics": m,
                                                    "elapsed": round(time.monotonic() - t0, 3)}),
                       after_train=after_train)
        summary = {"steps": result.steps, "seconds": result.seconds, "train_seconds": result.train_seconds,
                   "seconds_per_step": result.seconds_per_step,
                   "examples": result.examples, "precision": result.precision, "device": result.device}
        metrics = {**result.final_metrics, **summary}
        if gate:
            summary.update(gate_preference=result.after_train, gate_seconds=result.after_train_seconds)
        # No SIGTERM/SIGINT between the rename into place and the "done" event: a version
        # that exists must be reported as done, never as failed.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            manifest = registry.commit(
                result.output_dir, parent=parent, base_model=spec["base_model"], template=template,
                dataset_ids=dataset_ids, metrics=metrics, method=spec["method"],
                reason=spec.get("reason") or f"{spec['method']} on {result.examples} rows from {parent or 'the base'}",
                move=True)
            emit({"event": "done", "version": manifest.version, "manifest": manifest.to_dict(), "result": summary})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return manifest.to_dict()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gate_scorer(gate: dict, template: str):
    """The after-training hook scoring the gate's held-out pairs (spec "gate")."""
    if not gate.get("rows"):
        raise ValueError("spec gate needs 'rows' (a JSONL of held-out DPO pairs)")
    rows = load_rows(gate["rows"])
    live = gate.get("live")

    def score(model, tokenizer) -> dict:
        from agentloop.rl.gate import score_loaded

        return score_loaded(model, tokenizer, template, rows, {"live": live, "candidate": "default"})

    return score


def _event_stream() -> IO[str]:
    """Keep the real stdout for events; point fd 1 (and sys.stdout) at stderr for everything else."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _die_with_parent() -> None:
    """SIGTERM this job when the process that started it dies (Linux; a no-op elsewhere).

    The job runs in its own session, so a SIGKILLed gateway would leave it training: the
    restarted gateway marks the run failed and may start another, and two trainings would
    share the machine until the orphan noticed its closed stdout at its next event (a
    whole step later, minutes on a big model). The kernel fires the signal when the
    thread that started us exits, so start_job must be called from a long-lived thread
    (the gateway's event loop is one).
    """
    parent = os.environ.get("AGENTLOOP_JOB_PARENT")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stream = _event_stream()

    finished = False

    def emit(event: dict) -> None:
        nonlocal finished
        stream.write(json.dumps(event, default=str) + "\n")
        stream.flush()
        finished = finished or event["event"] == "done"

    def on_signal(signum, frame):
        # After "done" (a stop request held back during the commit lands here), only
        # cleanup is left: finish it rather than report a committed version as failed.
        if not finished:
            raise JobTerminated(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _die_with_parent()  # after the handlers: the signal must unwind through the cleanup
        if len(argv) != 1:
            raise ValueError("usage: python -m agentloop.rl.job <spec.json | ->")
        text = sys.stdin.read() if argv[0] == "-" else Path(argv[0]).read_text()
        spec = json.loads(text)
        if not isinstance(spec, dict):
            raise ValueError("the spec must be a JSON object")
        run_spec(spec, emit)
        return 0
    except JobTerminated as exc:
        print(f"rl.job: {exc}", file=sys.stderr)  # the job's log says why it stopped
        # A stop whose cause is the starter's death (see _die_with_parent) has no reader left.
        with contextlib.suppress(BrokenPipeError):
            emit({"event": "failed", "error": str(exc)})
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - every failure is reported as an event
        import traceback

        traceback.print_exc()  # to stderr, the job's log
        emit({"event": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1


def start_job(spec: dict, *, log_path: str | Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m agentloop.rl.job -` with `spec` on its stdin. stdout (text, line-buffered) carries
    the events -- read them with `read_events`; stderr goes to `log_path` (appended) if given,
    else is inherited. The child runs in its own session, so signals aimed at the caller's
    process group do not reach it; stop it with proc.terminate() (clean, reports "failed")."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["AGENTLOOP_JOB_PARENT"] = str(os.getpid())  # see _die_with_parent
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p)
    stderr = open(log_path, "ab") if log_path is not None else None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agentloop.rl.job", "-"], cwd=ROOT, env=full_env, text=True,
                                bufsize=1, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True)
    finally:
        if stderr is not None:
            stderr.close()  # the child holds its own copy
    try:
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died before reading; read_events reports the exit
    return proc


def read_events(proc: subprocess.Popen) -> Iterator[dict[str, Any]]:
    """Yield the job's events until it exits. If it ends without a "done"/"failed" event
    (e.g. SIGKILL), a final {"event": "failed", "error": "...exit code..."} is yielded.
    The events are authoritative: "done" means the version exists, even if a stop request
    that raced the exit leaves a non-zero returncode."""
    final = False
    for line in proc.stdout:
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = {"event": "output", "text": line}
        final = final or event.get("event") in ("done", "failed")
        yield event
    code = proc.wait()
    if not final:
        yield {"event": "failed", "error": f"job exited with code {code} without reporting a result",
               "returncode": code}


if __name__ == "__main__":
    sys.exit(main())
