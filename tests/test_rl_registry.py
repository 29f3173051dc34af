"""rl/registry.py: numbered versions, atomic commits, validation, statuses, leftovers, verify.

No torch here: adapters are written with rl/zero_adapter.py (numpy) for a
small fake base model whose config.json is all the registry reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from agentloop.rl.registry import (
    AdapterInvalid, AdapterRegistry, InvalidStatus, RegistryError, VersionNotFound, sha256_file,
    validate_adapter,
)
from agentloop.rl.zero_adapter import write_zero_adapter

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
}


@pytest.fixture
def base(tmp_path) -> Path:
    d = tmp_path / "base-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(BASE_CONFIG))
    return d


@pytest.fixture
def reg(tmp_path, base) -> AdapterRegistry:
    r = AdapterRegistry(tmp_path / "adapters" / "tiny-slug")
    write_zero_adapter(base, r.root / "v0000")  # what serve/engine/boot.py writes
    return r


def adapter(base: Path, where: Path, *, seed: int = 1, r: int = 8) -> Path:
    """A valid adapter with non-zero B (so different seeds give different weights)."""
    write_zero_adapter(base, where, r=r, seed=seed)
    w = load_file(str(where / "adapter_model.safetensors"))
    rng = np.random.default_rng(seed)
    w = {k: (rng.normal(size=v.shape).astype(np.float32) * 0.01 if "lora_B" in k else v) for k, v in w.items()}
    save_file(w, str(where / "adapter_model.safetensors"))
    return where


def commit(reg: AdapterRegistry, src: Path, base: Path, parent: str | None = "v0000", **kw):
    return reg.commit(src, parent=parent, base_model=str(base), template="chatml-tools", dataset_ids=[1, 2],
                      metrics={"loss": 0.5}, method="dpo", **kw)


def tmp_dirs(reg: AdapterRegistry) -> list[Path]:
    return sorted(reg.root.glob(".tmp-*"))


def test_commit_numbers_versions_and_writes_manifest(reg, base, tmp_path):
    assert [m.version for m in reg.list()] == ["v0000"]
    assert reg.live().version == "v0000"  # the zero adapter's manifest, as serve wrote it
    assert reg.next_version() == "v0001"

    src = adapter(base, tmp_path / "a1", seed=1)
    m1 = commit(reg, src, base)
    m2 = commit(reg, adapter(base, tmp_path / "a2", seed=2), base, parent="v0001", move=True)
    assert (m1.version, m2.version) == ("v0001", "v0002")
    assert src.exists() and not (tmp_path / "a2").exists()  # copy vs move
    assert [m.version for m in reg.list()] == ["v0000", "v0001", "v0002"]
    assert reg.next_version() == "v0003"

    on_disk = json.loads((reg.root / "v0002" / "manifest.json").read_text())
    assert on_disk["version"] == "v0002" and on_disk["parent"] == "v0001"
    assert on_disk["status"] == "candidate" and on_disk["method"] == "dpo" and on_disk["template"] == "chatml-tools"
    assert on_disk["dataset_ids"] == [1, 2] and on_disk["metrics"] == {"loss": 0.5}
    assert on_disk["base_model"] == str(base) and on_disk["created_at"].endswith("Z")
    assert on_disk["weights_sha256"] == sha256_file(reg.root / "v0002" / "adapter_model.safetensors")
    assert on_disk["adapter"]["r"] == 8
    assert [h["status"] for h in on_disk["history"]] == ["candidate"]
    assert sorted(p.name for p in (reg.root / "v0002").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert reg.get("agentloop@v0002").version == "v0002"  # served names resolve too
    assert reg.live().version == "v0000"  # a commit never changes what is live
    assert tmp_dirs(reg) == []

    with pytest.raises(VersionNotFound):
        reg.get("v0042")
    with pytest.raises(VersionNotFound):
        commit(reg, src, base, parent="v0042")
    with pytest.raises(InvalidStatus):
        commit(reg, src, base, status="live")  # promotion is a separate, verified step


def test_concurrent_commits_get_distinct_versions(reg, base, tmp_path):
    n = 6
    srcs = [adapter(base, tmp_path / f"c{i}", seed=10 + i) for i in range(n)]
    code = (
        "import sys; from agentloop.rl.registry import AdapterRegistry\n"
        "r = AdapterRegistry(sys.argv[1])\n"
        "print(r.commit(sys.argv[2], parent='v0000', base_model=sys.argv[3], method='dpo').version)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(reg.root), str(s), str(base)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in srcs]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    versions = sorted(o[0].strip() for o in outs)
    assert versions == [f"v{i:04d}" for i in range(1, n + 1)]
    # Each version holds the weights of exactly one source, all different.
    hashes = {m.weights_sha256 for m in reg.list()[1:]}
    assert hashes == {sha256_file(s / "adapter_model.safetensors") for s in srcs}
    assert tmp_dirs(reg) == []


def test_status_changes_persist_and_one_version_is_live(reg, base, tmp_path):
    v1 = commit(reg, adapter(base, tmp_path / "a1", seed=1), base).version
    v2 = commit(reg, adapter(base, tmp_path / "a2", seed=2), base).version

    reg.set_status(v1, "live", "gate passed")
    fresh = AdapterRegistry(reg.root)  # another process's view: only the files
    assert fresh.live().version == v1
    assert fresh.get("v0000").status == "retired" and fresh.get("v0000").reason == f"superseded by {v1}"

    reg.set_status(v2, "rejected", "lost the A/B on held-out feedback")
    reg.set_status(v2, "live", "manual override")
    fresh = AdapterRegistry(reg.root)
    assert [(m.version, m.status) for m in fresh.list()] == [("v0000", "retired"), (v1, "retired"), (v2, "live")]
    hist = fresh.get(v2).history
    assert [h["status"] for h in hist] == ["candidate", "rejected", "live"]
    assert hist[1]["reason"] == "lost the A/B on held-out feedback"
    assert hist[0]["at"] < hist[1]["at"] < hist[2]["at"]
    # Rewrites leave no temp files behind in the version folders.
    assert sorted(p.name for p in (reg.root / v2).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]

    with pytest.raises(InvalidStatus):
        reg.set_status(v1, "deployed")
    with pytest.raises(VersionNotFound):
        reg.set_status("v0099", "retired")


def test_live_after_a_crash_between_marking_and_retiring(reg, base, tmp_path):
    """set_status marks the new live version before retiring the old one: a crash in between
    leaves two 'live' manifests, and live() must answer the one promoted last."""
    v1 = commit(reg, adapter(base, tmp_path / "a1", seed=1), base).version
    reg._set(v1, "live", "promoted, then the process died")
    assert {m.version for m in reg.list() if m.status == "live"} == {"v0000", v1}
    assert reg.live().version == v1


def _truncate(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _wrong_rank_shapes(d: Path) -> None:
    w = load_file(str(d / "adapter_model.safetensors"))
    k = next(k for k in w if "lora_A" in k)
    w[k] = np.zeros((4, w[k].shape[1]), np.float32)  # config says r=8
    save_file(w, str(d / "adapter_model.safetensors"))


def _nan(d: Path) -> None:
    w = load_file(str(d / "adapter_model.safetensors"))
    k = next(k for k in w if "lora_B" in k)
    w[k][0, 0] = np.nan
    save_file(w, str(d / "adapter_model.safetensors"))


def _drop_b(d: Path) -> None:
    w = load_file(str(d / "adapter_model.safetensors"))
    del w[next(k for k in w if "lora_B" in k)]
    save_file(w, str(d / "adapter_model.safetensors"))


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "truncated"),
    (_wrong_rank_shapes, "do not match rank 8"),
    (lambda d: (d / "adapter_config.json").unlink(), "missing adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
    (_edit_config(peft_type="IA3"), "not 'LORA'"),
    (_edit_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]), "have no weights"),
    (_edit_config(target_modules=["q_proj"]), "not in target_modules"),
    (_nan, "NaN"),
    (_drop_b, "not both lora_A and lora_B"),
])
def test_corrupt_adapters_are_refused_with_the_reason(reg, base, tmp_path, damage, reason):
    src = adapter(base, tmp_path / "bad")
    damage(src)
    with pytest.raises(AdapterInvalid, match=reason) as exc:
        commit(reg, src, base)
    assert exc.value.reason and isinstance(exc.value, RegistryError)
    assert [m.version for m in reg.list()] == ["v0000"] and tmp_dirs(reg) == []


def test_rank_above_the_engine_maximum_is_refused(reg, base, tmp_path):
    src = adapter(base, tmp_path / "r32", r=32)
    with pytest.raises(AdapterInvalid, match="exceeds the maximum LoRA rank 16"):
        commit(reg, src, base)
    validate_adapter(src, max_rank=32)  # the same files are fine where rank 32 is served
    assert [m.version for m in reg.list()] == ["v0000"]


def test_shapes_must_fit_the_base_model(reg, base, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**BASE_CONFIG, "hidden_size": 96, "head_dim": 24}))
    src = adapter(other, tmp_path / "foreign")
    validate_adapter(src)  # self-consistent on its own...
    with pytest.raises(AdapterInvalid, match="does not fit the base model"):
        commit(reg, src, base)  # ...but not an adapter of this base
    deep = tmp_path / "deep-model"
    deep.mkdir()
    (deep / "config.json").write_text(json.dumps({**BASE_CONFIG, "num_hidden_layers": 4}))
    with pytest.raises(AdapterInvalid, match="has only 2 layers"):
        commit(reg, adapter(deep, tmp_path / "deep"), base)


def test_leftover_temp_dirs_are_ignored_and_collected(reg, base, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host_tmp = reg.make_temp_dir("train")  # ours: owner alive
    stale = host_tmp.with_name(host_tmp.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    adapter(base, stale / "adapter")  # a killed job's half-finished work
    (stale / "manifest.json").write_text("{}")
    assert [m.version for m in reg.list()] == ["v0000"]
    assert reg.next_version() == "v0001"

    torn = reg.root / "v0000" / ".manifest.json.abc123.tmp"  # a rewrite killed before os.replace
    torn.write_text('{"version": "v00')
    assert reg.get("v0000").status == "live"  # the real manifest is untouched

    removed = reg.gc()
    assert sorted(removed) == sorted([stale, torn]) and not stale.exists() and not torn.exists()
    assert host_tmp.exists()  # a live process's work is left alone
    host_tmp.rmdir()
    assert commit(reg, adapter(base, tmp_path / "a1"), base).version == "v0001"


def test_verify_detects_changed_files(reg, base, tmp_path):
    m = commit(reg, adapter(base, tmp_path / "a1"), base)
    assert reg.verify(m.version).weights_sha256 == m.weights_sha256

    weights = reg.root / m.version / "adapter_model.safetensors"
    w = load_file(str(weights))
    k = next(k for k in w if "lora_B" in k)
    w[k] = w[k] + 1e-3  # still a perfectly valid adapter, just not the one committed
    save_file(w, str(weights))
    with pytest.raises(AdapterInvalid, match="weights changed since commit"):
        reg.verify(m.version)
    with pytest.raises(AdapterInvalid):
        reg.set_status(m.version, "live", "must not promote a tampered adapter")
    assert reg.get(m.version).status == "candidate" and reg.live().version == "v0000"

    m2 = commit(reg, adapter(base, tmp_path / "a2", seed=5), base)
    cfg = reg.root / m2.version / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": 16', '"lora_alpha": 32'))
    with pytest.raises(AdapterInvalid, match="config changed since commit"):
        reg.verify(m2.version)


def test_trained_feedback_ids_follow_the_parent_links(reg, base, tmp_path):
    """What a version has been trained on: its own dataset ids and every ancestor's (a sibling's
    or a rolled-back child's do not count)."""
    reg.commit(adapter(base, tmp_path / "a1", seed=1), parent="v0000", base_model=str(base), dataset_ids=["f1", "f2"])
    reg.commit(adapter(base, tmp_path / "a2", seed=2), parent="v0001", base_model=str(base), dataset_ids=["f2", "f3"])
    reg.commit(adapter(base, tmp_path / "a3", seed=3), parent="v0001", base_model=str(base), dataset_ids=["f9"])
    assert reg.trained_feedback_ids("v0000") == []
    assert reg.trained_feedback_ids("v0001") == ["f1", "f2"]
    assert reg.trained_feedback_ids("v0002") == ["f1", "f2", "f3"]
    assert reg.trained_feedback_ids("agentloop@v0003") == ["f1", "f2", "f9"]
    with pytest.raises(VersionNotFound):
        reg.trained_feedback_ids("v0042")
