"""Faults of the learning side: the trainer SIGKILLed at chosen and seeded-random points, and
corrupt adapters offered for promotion.

How a kill lands exactly where we want it: the process under test is the real
`rl.job` (or a real `AdapterRegistry.commit`) started through a small harness
(`HARNESS` below) that wraps one function on its path so that, at the chosen
point, the process SIGKILLs itself -- no timing guesses, no cleanup code runs,
exactly like `kill -9` or the OOM killer. Mid-training kills are external, after
a seeded random step and delay.

After every kill the registry must be consistent: each `vNNNN` folder has a
valid manifest and re-hashes to it (`verify`), the live version is unchanged,
nothing half-written became a version or can be promoted, the leftovers are
collected by `gc()` (their owner is dead), and the next commit takes the next
free number. Corrupt or incompatible adapters are refused by promote (HTTP 400
in OpenAI's shape, and the CLI's one-line error) with the reason, while the
live version keeps serving.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agentloop.rl.job import read_events
from agentloop.rl.registry import AdapterRegistry, VersionNotFound
from agentloop.rl.zero_adapter import write_zero_adapter
from tests.conftest import ADMIN_KEY, ROOT, noisy_adapter

SEED = int(os.environ.get("AGENTLOOP_FAULT_SEED", "6"))  # another seed: other kill points
# Runs inside the killed process. argv: point, then "job" (spec on stdin) or "commit" root src base.
HARNESS = r'''
import os, signal, sys
point, what = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def half(path):  # leave a half-written file behind, as a kill mid-write does
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)

import agentloop.rl.registry as registry
if point == "load":                      # the dataset is being read
    import agentloop.rl.job as job
    _load = job.load_rows
    job.load_rows = lambda path: (_load(path), die())
elif point == "save":                    # the trainer is writing the adapter's weights
    import peft.peft_model as pm
    _save = pm.safe_save_file
    def save(tensors, filename, *a, **k):
        _save(tensors, filename, *a, **k)
        half(filename)
        die()
    pm.safe_save_file = save
elif point == "copy":                    # commit: the weights are being copied into the registry
    _copy = registry.shutil.copyfile
    def copy(src, dst, *a, **k):
        _copy(src, dst, *a, **k)
        if str(dst).endswith("adapter_model.safetensors"):
            half(dst)
            die()
    registry.shutil.copyfile = copy
elif point == "manifest":                # commit: the manifest is half written, not yet in place
    def write(path, data):
        (path.parent / f".{path.name}.x.tmp").write_text('{"version": "v0')
        die()
    registry._write_json_atomic = write
elif point == "rename":                  # commit: complete and valid, about to be renamed into place
    registry.os.rename = lambda src, dst: die()
elif point == "renamed":                 # commit: in place, before anyone was told
    _rename = registry.os.rename
    registry.os.rename = lambda src, dst: (_rename(src, dst), die())
elif point == "promote":                 # set_status(live): new one marked, old one not yet retired
    _set = registry.AdapterRegistry._set
    calls = []
    def set_(self, *a):
        calls.append(a)
        if len(calls) == 2:
            die()
        return _set(self, *a)
    registry.AdapterRegistry._set = set_

if what == "job":
    from agentloop.rl.job import main
    sys.exit(main(["-"]))
reg = registry.AdapterRegistry(sys.argv[3])
if what == "commit":
    print(reg.commit(sys.argv[4], parent="v0000", base_model=sys.argv[5], method="dpo").version)
else:
    reg.set_status(sys.argv[4], "live", "promoted by the harness")
'''


def harness(point: str, what: str, *args: str, log: Path | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", HARNESS, point, what, *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(log, "ab") if log else subprocess.DEVNULL, start_new_session=True)


def consistent(reg: AdapterRegistry, live: str, versions: list[str]) -> None:
    """The registry after a kill: exactly `versions`, each whole, `live` live, leftovers collectable."""
    numbered = sorted(p.name for p in reg.root.iterdir() if p.name.startswith("v"))
    assert numbered == versions, "a folder became a version it should not be"
    for v in versions:
        reg.verify(v)  # manifest parses, files re-hash to it, adapter validates
    assert reg.live().version == live
    assert [m.version for m in reg.list() if m.status == "live"] == [live]
    reg.gc()  # the killed process is gone: its temp folders and torn manifest temp files go
    assert list(reg.root.glob(".tmp-*")) == [] and list(reg.root.glob("v*/.*.tmp")) == []
    nxt = reg.next_version()
    assert nxt == f"v{len(versions):04d}"
    with pytest.raises(VersionNotFound):  # nothing half-written can be promoted
        reg.set_status(nxt, "live", "must not exist")


@pytest.fixture
def reg(tiny_model, tmp_path) -> AdapterRegistry:
    r = AdapterRegistry(tmp_path / "adapters" / "tiny")
    write_zero_adapter(tiny_model, r.root / "v0000")
    return r


@pytest.mark.parametrize("point, made", [("copy", False), ("manifest", False), ("rename", False),
                                         ("renamed", True)])
def test_commit_killed_at_each_step(reg, tiny_model, tmp_path, point, made):
    src = noisy_adapter(reg.root / "v0000", tmp_path / "src", seed=3)
    proc = harness(point, "commit", str(reg.root), str(src), str(tiny_model))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and out == ""  # died before it could report a version
    if not made:
        assert list(reg.root.glob(".tmp-commit-*")), "the kill should have left its work behind"
    # "renamed": the version is complete and valid, but its committer never reported it, so
    # nothing will promote it; it stays a candidate anyone can inspect or reject.
    consistent(reg, "v0000", ["v0000", "v0001"] if made else ["v0000"])
    if made:
        assert reg.get("v0001").status == "candidate"
    nxt = reg.next_version()
    assert reg.commit(src, parent="v0000", base_model=str(tiny_model)).version == nxt


@pytest.mark.parametrize("point", ["manifest", "promote"])
def test_promotion_killed_mid_way(reg, tiny_model, tmp_path, point):
    src = noisy_adapter(reg.root / "v0000", tmp_path / "src", seed=4)
    v1 = reg.commit(src, parent="v0000", base_model=str(tiny_model)).version
    proc = harness(point, "set_status", str(reg.root), v1)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    if point == "manifest":
        # Killed while rewriting v0001's manifest: the torn temp file is beside the intact manifest.
        assert list((reg.root / v1).glob(".manifest.json.*.tmp"))
        consistent(reg, "v0000", ["v0000", v1])
        assert reg.get(v1).status == "candidate"
        return
    # Killed after marking v0001 live, before retiring v0000: both say live on disk, and the
    # one promoted last is the live one -- never none, never the older.
    assert {m.version for m in reg.list() if m.status == "live"} == {"v0000", v1}
    assert reg.live().version == v1
    reg.set_status(v1, "live", "re-run after the crash")  # finishing the promotion repairs it
    consistent(reg, v1, ["v0000", v1])


# ---------------------------------------------------------------- the real training job

ROWS = [{"id": 700 + i, "prompt": [{"role": "user", "content": p}],
         "chosen": [{"role": "assistant", "content": "Certainly! Tell me what you need."}],
         "rejected": [{"role": "assistant", "content": "Sure. What should I check?"}], "tools": None}
        for i, p in enumerate(["Can you help me?", "Could you check something?", "Please look at this.",
                               "I need a hand."])]


def job_spec(tiny_model, reg: AdapterRegistry, data: Path, max_steps: int) -> str:
    return json.dumps({"method": "dpo", "registry": str(reg.root), "base_model": str(tiny_model),
                       "dataset": str(data), "parent": "live", "template": "chatml-tools",
                       "config": {"max_length": 128, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                                  "max_steps": max_steps, "num_threads": 2}})


def run_killed_job(point: str, tiny_model, reg: AdapterRegistry, tmp_path: Path, rng: random.Random) -> list[dict]:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    mid = point == "mid-training"
    proc = harness("none" if mid else point, "job", log=tmp_path / f"job-{point}.log")
    proc.stdin.write(job_spec(tiny_model, reg, data, max_steps=500 if mid else 2))
    proc.stdin.close()
    events, killed_at = [], None
    step = rng.randint(1, 3)
    for event in read_events(proc):
        events.append(event)
        if mid and event.get("event") == "step" and event["step"] == step:
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the next step
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = f"after step {step}"
    assert proc.returncode == -signal.SIGKILL, (events, (tmp_path / f"job-{point}.log").read_text()[-2000:])
    assert events[-1]["event"] == "failed" and "without reporting a result" in events[-1]["error"]
    assert not any(e["event"] == "done" for e in events)
    print(f"\n[faults] trainer SIGKILL at {point} {killed_at or ''}: events {[e['event'] for e in events]}")
    return events


def test_training_job_killed_at_random_points(tiny_model, reg, tmp_path):
    """Three real jobs: killed while reading the dataset, mid-training (seeded step and delay), and
    half-way through writing the adapter's weights. None leaves a version; the registry stays whole."""
    rng = random.Random(SEED)
    live = reg.commit(noisy_adapter(reg.root / "v0000", tmp_path / "live", seed=5), parent="v0000",
                      base_model=str(tiny_model)).version
    reg.set_status(live, "live", "the version the jobs continue from")
    for point in ("load", "mid-training", "save"):
        events = run_killed_job(point, tiny_model, reg, tmp_path, rng)
        work = list(reg.root.glob(".tmp-train-*"))
        if point == "load":
            assert not any(e["event"] == "start" for e in events) and work == []
        else:
            assert len(work) == 1  # its work in progress, never a version
        if point == "save":
            weights = work[0] / "adapter" / "adapter_model.safetensors"
            assert weights.exists()  # half-written, where nothing looks for versions
        consistent(reg, live, ["v0000", live])
    # The registry still works: a job that is not killed commits the next version.
    data = tmp_path / "pairs.jsonl"
    proc = harness("none", "job", log=tmp_path / "job-ok.log")
    proc.stdin.write(job_spec(tiny_model, reg, data, max_steps=1))
    proc.stdin.close()
    events = list(read_events(proc))
    assert events[-1]["event"] == "done" and events[-1]["version"] == "v0002", events
    assert reg.verify("v0002").parent == live and reg.live().version == live


# ---------------------------------------------------------------- corrupt adapters offered for promotion

def _committed(server, tmp_path: Path, name: str, seed: int, base_dir: Path | None = None):
    """A noisy adapter committed to the session server's registry (for `base_dir`'s shapes if given)."""
    reg = AdapterRegistry(server.adapters_root)
    base_model = reg.get("v0000").base_model
    if base_dir is None:
        src = noisy_adapter(server.adapters_root / "v0000", tmp_path / name, seed=seed)
    else:
        src = write_zero_adapter(base_dir, tmp_path / name, seed=seed)
    return reg.commit(src, parent="v0000", base_model=str(base_dir or base_model), method="test")


def _edit_manifest(m, **changes) -> None:
    path = m.path / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _ask(server) -> dict:
    import httpx

    greeting = next(s for s in server.manifest["scripts"] if s["id"] == "greeting")
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": "agentloop", "messages": greeting["messages"], "temperature": 0, "max_tokens": 24})
    r.raise_for_status()
    return r.json()


def test_corrupt_adapters_are_refused_while_the_live_version_serves(server, tmp_path):
    live = _committed(server, tmp_path, "live", seed=21)
    assert server.admin("POST", "/admin/promote", json={"version": live.version}).status_code == 200
    try:
        served = _ask(server)
        assert served["model"] == f"agentloop@{live.version}"

        # 1. The weights do not hash to what the manifest recorded at commit.
        wrong_hash = _committed(server, tmp_path, "hash", seed=22)
        _edit_manifest(wrong_hash, weights_sha256="0" * 64)
        # 2. Trained for another base model (as the manifest says).
        other_base = _committed(server, tmp_path, "base", seed=23)
        _edit_manifest(other_base, base_model="/models/some-other-model")
        # 3. Shapes of another model, whatever the manifest claims.
        other = tmp_path / "wider-model"
        other.mkdir()
        cfg = json.loads((server.model_dir / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
        wrong_shape = _committed(server, tmp_path, "shape", seed=24, base_dir=other)
        _edit_manifest(wrong_shape, base_model=str(server.model_dir))
        # 4. Truncated weights (a copy cut short), refused through the CLI.
        truncated = _committed(server, tmp_path, "trunc", seed=25)
        w = truncated.path / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])

        cases = [(wrong_hash, "adapter_invalid", "weights changed since commit"),
                 (other_base, "adapter_incompatible", "trained for /models/some-other-model"),
                 (wrong_shape, "adapter_invalid", "does not fit the base model")]
        for m, code, reason in cases:
            r = server.admin("POST", "/admin/promote", json={"version": m.version})
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == code and reason in err["message"], r.text
            assert err["type"] == "invalid_request_error" and err["param"] == "version"
            now = _ask(server)  # the live version keeps serving, unchanged
            assert now["model"] == served["model"] and now["choices"] == served["choices"]
        cli = subprocess.run([sys.executable, "-m", "agentloop.serve.cli", "promote", truncated.version, "--url", server.url,
                              "--admin-key", ADMIN_KEY], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 1 and cli.stdout == ""
        assert cli.stderr.startswith(f"agentloop: 400: Adapter {truncated.version} was refused") \
            and "truncated" in cli.stderr, cli.stderr

        after = _ask(server)  # nothing changed for users
        assert after["model"] == f"agentloop@{live.version}" and after["choices"] == served["choices"]
        listed = {a["version"]: a["status"] for a in server.admin("GET", "/admin/adapters").json()["data"]}
        assert listed[live.version] == "live"
        assert all(listed[m.version] == "candidate" for m in (wrong_hash, other_base, wrong_shape, truncated))
    finally:
        server.admin("POST", "/admin/rollback", json={"version": "v0000"})


STARTER = r'''
import json, sys
from agentloop.rl.job import read_events, start_job
proc = start_job(json.loads(sys.stdin.read()), log_path=sys.argv[1])
print(json.dumps({"event": "pid", "pid": proc.pid}), flush=True)
for event in read_events(proc):
    print(json.dumps(event), flush=True)
'''


def test_job_dies_with_the_gateway_that_started_it(tiny_model, reg, tmp_path):
    """SIGKILL of the process running a training (the gateway) must not leave the job training on
    as an orphan beside the restarted gateway's next run: it is stopped and cleans up."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    log = tmp_path / "job.log"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(log)], cwd=ROOT, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    starter.stdin.write(job_spec(tiny_model, reg, data, max_steps=500))
    starter.stdin.close()
    job = None
    for line in starter.stdout:
        event = json.loads(line)
        job = job or psutil.Process(event["pid"]) if event["event"] == "pid" else job
        if event["event"] in ("start", "failed"):
            break
    assert event["event"] == "start", (event, log.read_text()[-2000:])
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait(30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if job.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        job.kill()
        raise AssertionError("the job outlived the process that started it")
    assert "terminated by SIGTERM" in log.read_text()  # stopped by the signal, through its cleanup
    assert list(reg.root.glob(".tmp-*")) == []  # it removed its own work
    consistent(reg, "v0000", ["v0000"])
