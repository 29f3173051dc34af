"""One iteration of the learning loop: feedback -> dataset -> training job -> gate -> promotion.

The orchestration only: datasets come from rl/datasets.py, training runs as
its own process (rl/job.py), which also scores the gate's held-out pairs on
the model it has loaded (rl/gate.py `score_loaded`), and everything that touches the serving engines goes through
`LoopHooks` (the gateway implements them in serve/services/loop.py). Nothing here
imports fastapi, and nothing blocking runs on the caller's event loop: training is a
subprocess, and every store statement, dataset build and registry change runs in a worker
thread (tests/test_event_loop.py holds a store that sleeps per statement against it).

Invariants:
- every state change of a run is written to the store (status, dataset
  stats, per-step metrics, gate numbers, reason), so a run is inspectable
  and a restart sees the truth; a run that fails (the database going away
  included) keeps trying to record that until the store takes it, so it never
  stays active and blocks the next run;
- a candidate that fails the gate is kept in the registry as `rejected` with
  its numbers and nothing changes for users; only a passing candidate of a
  run asked to promote becomes live;
- feedback of keys marked untrusted never enters a training set or the gate's
  held-out pairs (unless `exclude_untrusted` is turned off), and the per-caller
  caps bound what one key contributes to both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from agentloop.rl.datasets import DatasetConfig, build_dataset
from agentloop.rl.dpo import DPOJobConfig
from agentloop.rl.gate import GateConfig, decide, graded_check, load_regression_set, tool_validity
from agentloop.rl.graders import GraderSet, build_graders
from agentloop.rl.job import read_events, start_job
from agentloop.rl.registry import AdapterRegistry, VersionNotFound
from agentloop.rl.sampling import SamplingConfig, sample, sampling_prompts
from agentloop.rl.versions import alias_of, is_base, served_name, version_of

log = logging.getLogger("agentloop.loop")


@dataclass
class LoopConfig:
    method: str = field(default="dpo", metadata={"help": "'dpo' or 'kto'."})
    min_train_examples: int = field(default=4, metadata={"help": "Fewer training examples than this: no run."})
    eval_percent: int = field(default=20, metadata={"help": "Share of conversations held out for the gate (0..100)."})
    max_caller_fraction: float | None = field(default=None, metadata={
        "help": "Poisoning defence: at most this share (0..1] of the examples may come from one caller (API key); "
                "applied before the held-out split, so it bounds the training and the gate's sets alike."})
    max_per_caller: int | None = field(default=None, metadata={
        "help": "Poisoning defence: at most this many examples per caller, training and held-out together."})
    exclude_callers: tuple[str, ...] = field(default=(), metadata={"help": "Callers never trained on (untrusted)."})
    exclude_untrusted: bool = field(default=True, metadata={
        "help": "Leave out the feedback of API keys marked untrusted (`agentloop keys untrust ID`): stored, but "
                "never in a training set nor in the gate's held-out pairs."})
    train: dict = field(default_factory=dict, metadata={"help": "Overrides of the DPO/KTO job config."})
    train_on: str = field(default="new", metadata={
        "help": "'new': only feedback the live version's lineage (it and its parents) was not trained on "
                "(manifests' dataset_ids), so each piece of feedback is trained on once and an iteration costs "
                "what its new feedback costs; 'all': every usable feedback, each run (the continued adapter sees "
                "old feedback again, one more pass per run; measured to drift down over 3 iterations, "
                "docs/benchmarks.md). The gate's held-out pairs always come from all feedback."})
    positives: bool = field(default=True, metadata={
        "help": "DPO: train on thumbs-up answers that have no thumbs-down to pair with, through the NLL term "
                "(rl/datasets.py DatasetConfig.positives); only when the job's sft_weight is > 0."})
    gate: GateConfig = field(default_factory=GateConfig, metadata={"help": "The promotion gate."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={
        "help": "On-policy samples (rl/sampling.py): for each training conversation with reference feedback, k "
                "answers of the live version, graded with the logged ones; k=0 turns it off."})
    min_new_feedback: int = field(default=32, metadata={"help": "Scheduler: new feedback that triggers a run."})
    period_seconds: float = field(default=24 * 3600, metadata={
        "help": "Scheduler: also run when this much time passed since the last run and any feedback is new."})

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if self.method not in ("dpo", "kto"):
            raise ValueError("method must be 'dpo' or 'kto'")
        if self.train_on not in ("all", "new"):
            raise ValueError("train_on must be 'all' or 'new'")
        if not 0 <= self.eval_percent <= 100:
            raise ValueError("eval_percent must be in [0, 100]")
        if self.min_train_examples < 1:
            raise ValueError("min_train_examples must be >= 1")
        self.exclude_callers = tuple(self.exclude_callers)

    @property
    def train_positives(self) -> bool:
        """Whether the DPO training set gets positive-only rows: only a job with an NLL term learns from them."""
        sft_weight = self.train.get("sft_weight", {f.name: f for f in fields(DPOJobConfig)}["sft_weight"].default)
        return self.method == "dpo" and self.positives and float(sft_weight) > 0

    @classmethod
    def from_params(cls, params: dict | None, base: "LoopConfig | None" = None) -> "LoopConfig":
        d = asdict(base or cls())
        unknown = set(params or {}) - set(d)
        if unknown:
            raise ValueError(f"unknown loop parameter(s): {sorted(unknown)}")
        d.update(params or {})
        return cls(**d)


class LoopHooks(Protocol):
    """What an iteration needs from the serving side."""

    def live_version(self) -> str: ...
    async def load_candidate(self, version: str) -> str: ...   # returns the served name
    async def unload(self, name: str) -> None: ...
    async def chat(self, body: dict) -> dict: ...
    async def sample(self, body: dict, version: str) -> dict: ...  # through the chat path, unlogged
    async def promote(self, version: str, reason: str) -> None: ...


class Iteration:
    def __init__(self, store, registry: AdapterRegistry, *, base_model: str, template: str, hooks: LoopHooks,
                 config: LoopConfig, work_dir: Path, graders: GraderSet | None = None):
        self.store = store
        # Grade the answers reference feedback is about, and the gate's held-out graded prompts.
        self.graders = graders if graders is not None else build_graders()
        self.registry = registry
        self.base_model = base_model
        self.template = template
        self.hooks = hooks
        self.cfg = config
        self.work_dir = Path(work_dir)
        self.final_retry_seconds = 0.5  # first wait before a failed run's state is written again

    async def _save(self, run_id: str, **fields) -> dict:
        """Write a run's change in a worker thread: on a networked database a statement on the
        event loop would stall every stream of this gateway while it waits."""
        return await asyncio.to_thread(self.store.update_run, run_id, **fields)

    async def _save_final(self, run_id: str, **fields) -> dict:
        """A run's last write, retried until the store takes it: a run left active in the
        store would refuse every later run (one at a time) while this process lives."""
        wait = self.final_retry_seconds
        while True:
            try:
                return await self._save(run_id, **fields)
            except Exception as e:  # noqa: BLE001 - the database may be down: wait for it
                log.warning("run %s: could not record %s (%s); retrying in %.1f s", run_id, fields.get("status"),
                            e, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 30.0)

    async def run(self, run: dict) -> dict:
        run_id = run["id"]
        try:
            return await self._run(run)
        except asyncio.CancelledError:
            try:
                await self._save(run_id, status="failed", reason="cancelled (the gateway stopped)")
            except Exception:  # noqa: BLE001 - the next start marks a run of a dead owner failed
                log.warning("run %s: cancelled, and its state could not be recorded", run_id)
            raise
        except Exception as e:
            log.exception("run %s failed", run_id)
            return await self._save_final(run_id, status="failed", reason=f"{type(e).__name__}: {e}")

    async def _run(self, run: dict) -> dict:
        run_id, cfg = run["id"], self.cfg
        await self._save(run_id, status="running")
        work = self.work_dir / run_id
        phases: dict[str, float] = {}
        t = time.monotonic()
        # 1. The datasets: training data for the chosen method, and preference pairs for the gate.
        untrusted = tuple(await asyncio.to_thread(self.store.untrusted_callers)) if cfg.exclude_untrusted else ()
        common = dict(eval_percent=cfg.eval_percent, max_caller_fraction=cfg.max_caller_fraction,
                      max_per_caller=cfg.max_per_caller,
                      exclude_callers=tuple(dict.fromkeys(cfg.exclude_callers + untrusted)))
        live = self.hooks.live_version()
        trained: tuple[str, ...] = ()
        if cfg.train_on == "new":
            try:
                trained = tuple(await asyncio.to_thread(self.registry.trained_feedback_ids, live))
            except VersionNotFound:
                pass  # no manifest, nothing known to be trained; the job refuses a missing parent itself
        samples, sampling = await self._sample(live, common, trained)
        phases["sampling"] = sampling["seconds"]
        build = await asyncio.to_thread(build_dataset, self.store, DatasetConfig(
            kind=cfg.method, positives=cfg.train_positives, trained_feedback_ids=trained, **common),
            graders=self.graders, samples=samples)
        pairs = build if cfg.method == "dpo" else await asyncio.to_thread(
            build_dataset, self.store, DatasetConfig(kind="dpo", **common), graders=self.graders)
        files = await asyncio.to_thread(build.to_jsonl, work / "data")
        gate_files = await asyncio.to_thread(pairs.to_jsonl, work / "gate") if pairs is not build else files
        dataset = {"kind": cfg.method, "train": len(build.train), "eval": len(build.eval),
                   "gate_pairs": len(pairs.eval), "gate_callers": len({r["caller"] for r in pairs.eval}),
                   "untrusted_callers": len(untrusted), "stats": build.stats,
                   "feedback_ids": len(build.dataset_ids),
                   # Rows made from grades, and how many answers were graded for them (rl/graded.py).
                   "graded_rows": sum(r["graded"] for r in build.train + build.eval),
                   "graded_candidates": build.stats["graded"]["candidates"], "sampling": sampling}
        await self._save(run_id, dataset=dataset)
        phases["dataset"] = round(time.monotonic() - t - sampling["seconds"], 3)
        if len(build.train) < cfg.min_train_examples:
            return await self._save(run_id, status="failed", reason=(
                f"not enough {'new ' if trained else ''}training data: {len(build.train)} examples "
                f"(< {cfg.min_train_examples})"))

        # 2. Training, in its own process; the candidate lands in the registry only on success.
        # The job also scores the gate's held-out pairs, under the live adapter and the candidate,
        # while it has the model loaded (a separate scoring process cost a start and a load).
        gate_spec = {"rows": str(gate_files["eval"]), "live": self._gate_adapter_path(live)}
        spec = {"method": cfg.method, "registry": str(self.registry.root), "base_model": self.base_model,
                "dataset": str(files["train"]), "parent": live, "template": self.template,
                "config": dict(cfg.train), "dataset_ids": build.dataset_ids, "reason": f"trained by {run_id}",
                "gate": gate_spec}
        if cfg.method == "kto":
            spec["config"].setdefault("desirable_weight", build.desirable_weight)
            spec["config"].setdefault("undesirable_weight", build.undesirable_weight)
        await self._save(run_id, parent=live, params={**(run.get("params") or {}), "job": spec["config"]})
        t = time.monotonic()
        version, result = await self._train(run_id, spec, work)
        phases["train_job"] = round(time.monotonic() - t, 3)
        if version is None:
            return await self._save(run_id, status="failed", reason=result.get("error", "training failed"))
        # Where the iteration's wall time goes (the job's own `train_seconds` is the optimizer loop).
        pref = result.pop("gate_preference", None)
        pref_seconds = result.pop("gate_seconds", None)
        result = {**result, "phase_seconds": phases}
        await self._save(run_id, version=version, result=result)

        # 3. The gate.
        t = time.monotonic()
        cand_name = await self.hooks.load_candidate(version)
        try:
            if pref is None:
                raise RuntimeError("the training job reported no gate scores")
            gate = await self._gate(pref, pref_seconds, live, cand_name, common)
        except Exception:
            await self.hooks.unload(cand_name)
            raise
        phases["gate"] = round(time.monotonic() - t, 3)
        passed, reason = gate["passed"], gate["reason"]
        await self._save(run_id, gate=gate, result=result)
        if not passed:
            await self.hooks.unload(cand_name)
            await asyncio.to_thread(self.registry.set_status, version, "rejected", reason)
            return await self._save(run_id, status="rejected", reason=reason)
        if not run.get("promote", True):
            await self.hooks.unload(cand_name)
            await asyncio.to_thread(self.registry.set_status, version, "candidate",
                                    f"passed the gate, not promoted: {reason}")
            return await self._save(run_id, status="passed", reason=f"gate passed; not promoted ({reason})")
        t = time.monotonic()
        await self.hooks.promote(version, f"{run_id}: {reason}")
        phases["promotion"] = round(time.monotonic() - t, 3)
        return await self._save(run_id, status="promoted", reason=reason, result=result)

    async def _sample(self, live: str, common: dict, trained: tuple[str, ...]) -> tuple[dict, dict]:
        """Answers of the live version to the training conversations with references (rl/sampling.py)."""
        cfg = self.cfg.sampling
        if cfg.k == 0:
            return {}, {"prompts": 0, "answers": 0, "failed": 0, "seconds": 0.0}
        t = time.monotonic()
        prompts = await asyncio.to_thread(
            sampling_prompts, self.store, cfg, eval_percent=common["eval_percent"],
            exclude_callers=common["exclude_callers"], trained_feedback_ids=trained)
        samples, stats = await sample(prompts, lambda body: self.hooks.sample(body, live), cfg)
        return samples, {**stats, "seconds": round(time.monotonic() - t, 3)}

    async def _train(self, run_id: str, spec: dict, work: Path) -> tuple[str | None, dict]:
        work.mkdir(parents=True, exist_ok=True)
        proc = start_job(spec, log_path=work / "train.log")
        events = read_events(proc)
        done: dict = {}
        try:
            while True:
                event = await asyncio.to_thread(next, events, None)
                if event is None:
                    break
                kind = event.get("event")
                if kind == "step":
                    await asyncio.to_thread(self.store.add_run_metrics, run_id, event["step"],
                                            event.get("metrics") or {})
                elif kind in ("done", "failed"):
                    done = event
        except asyncio.CancelledError:
            proc.terminate()  # the job cleans up its temp folder and commits nothing
            raise
        if done.get("event") != "done":
            return None, {"error": done.get("error") or "training job ended without a result"}
        return done["version"], done.get("result") or {}

    def _gate_adapter_path(self, version: str) -> str | None:
        m = self.registry.get(version)
        # The base adapter (v0000) is the reference itself: its margins are 0 by definition.
        return None if m.parent is None and is_base(m.version) else str(m.path)

    async def _gate(self, pref: dict, pref_seconds: float | None, live: str, cand_name: str, common: dict) -> dict:
        """Decide on the job's preference scores, the tool-validity requests to the engine and both
        versions' grades on the held-out graded prompts."""
        cfg = self.cfg.gate
        t = time.monotonic()
        cases = load_regression_set()
        live_name = served_name(alias_of(cand_name), live)
        cand, live_v = await asyncio.gather(tool_validity(self.hooks.chat, cand_name, cases),
                                            tool_validity(self.hooks.chat, live_name, cases))
        tools = {"candidate": cand, "live": live_v}
        seconds = {"preference": pref_seconds, "tool_validity": round(time.monotonic() - t, 3)}
        t = time.monotonic()
        held = await asyncio.to_thread(
            sampling_prompts, self.store, self.cfg.sampling, eval_percent=common["eval_percent"],
            exclude_callers=common["exclude_callers"], held_out=True, max_prompts=cfg.max_graded_prompts)
        grades = await graded_check(held, self.hooks.sample, self.graders,
                                    {"candidate": version_of(cand_name), "live": live},
                                    max_tokens=self.cfg.sampling.max_tokens) if held else None
        seconds["grades"] = round(time.monotonic() - t, 3)
        passed, reason = decide(cfg, pref, tools, grades)
        return {"passed": passed, "reason": reason, "preference": pref, "tool_validity": tools, "grades": grades,
                "config": asdict(cfg), "seconds": seconds, "at": time.time()}
