"""An engine that restarts loads the served adapters again from disk: each is re-verified first.

The real AdapterManager, registry and router, and a fake engine that subclasses the real
HttpEngine (only its two HTTP calls are replaced), so `sync_adapters` runs as in the gateway.
Adapters are written with rl/zero_adapter.py for a small fake base model (no torch).
The live-engine version of this (a real vLLM engine killed and restarted with an intact live
adapter) is tests/test_zz_engine_restart.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from agentloop.rl.registry import AdapterRegistry
from agentloop.serve.engine.adapters import AdapterManager
from agentloop.serve.engine.client import HttpEngine
from agentloop.serve.engine.router import ModelRouter
from agentloop.rl.zero_adapter import write_zero_adapter
import pytest

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
}


class RestartedEngine(HttpEngine):
    """A vLLM server that just came back up: nothing loaded; records what it is asked to load."""

    def __init__(self, **kw):
        super().__init__("http://127.0.0.1:9", **kw)
        self.loaded: dict[str, str] = {}

    async def _loaded_models(self) -> set[str]:
        return set(self.loaded)

    async def load_adapter(self, name: str, path: str) -> None:
        self.loaded[name] = path
        self._synced.add(name)


def registry_with_versions(tmp_path: Path, root: str = "adapters", n: int = 2):
    """A small fake base model and a registry at `tmp_path/root`: the zero adapter and `n`
    trained-looking versions (random B). Returns (base folder, registry, their manifests)."""
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(BASE_CONFIG))
    reg = AdapterRegistry(tmp_path / root)
    write_zero_adapter(base, reg.root / "v0000")
    versions = []
    for seed in range(1, n + 1):
        src = tmp_path / f"src{seed}"
        write_zero_adapter(base, src, seed=seed)
        w = load_file(str(src / "adapter_model.safetensors"))
        rng = np.random.default_rng(seed)
        save_file({k: (rng.normal(size=v.shape).astype(np.float32) * 0.01 if "lora_B" in k else v)
                   for k, v in w.items()}, str(src / "adapter_model.safetensors"))
        versions.append(reg.commit(src, parent="v0000", base_model=str(base), method="dpo"))
    return base, reg, versions


def setup(tmp_path: Path, base_on_weights: bool = True):
    base, reg, versions = registry_with_versions(tmp_path)
    router = ModelRouter("agentloop", base_on_weights=base_on_weights)
    manager = AdapterManager(router, None, max_rank=64)
    live, canary = versions
    reg.set_status(live.version, "live", "promoted")
    manager.bind(reg.root, base_model=str(base))  # serves the base and the live version, as at start-up
    router.set_canary(router.add_version(canary.version, str(canary.path)).name, 0.25)
    engine = RestartedEngine(adapters=router.adapters, reverify=manager.reverify)
    return manager, router, engine, live, canary


# The base needs its zero adapter in the engine only when it does not run on the bare weights.
ON_WEIGHTS = pytest.mark.parametrize("on_weights", [True, False], ids=["base-on-weights", "base-adapter"])


def base_loaded(on_weights: bool) -> set[str]:
    return set() if on_weights else {"agentloop@v0000"}


@ON_WEIGHTS
def test_intact_served_versions_are_loaded_again(tmp_path, on_weights):
    manager, router, engine, live, canary = setup(tmp_path, on_weights)
    asyncio.run(engine.sync_adapters())
    assert set(engine.loaded) == base_loaded(on_weights) | {f"agentloop@{live.version}", f"agentloop@{canary.version}"}
    assert router.live == f"agentloop@{live.version}" and router.canary == (f"agentloop@{canary.version}", 0.25)
    assert set(router.adapters()) <= engine._synced  # so the engine counts as ready


@ON_WEIGHTS
def test_versions_damaged_on_disk_are_not_loaded_again_and_stop_being_served(tmp_path, on_weights):
    manager, router, engine, live, canary = setup(tmp_path, on_weights)
    # While the engine was down: the live weights were cut short (a crash, a full disk), and the
    # canary's were changed (still a loadable file, but not the weights that were checked).
    weights = live.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    w = load_file(str(canary.path / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in w.items()}, str(canary.path / "adapter_model.safetensors"))

    asyncio.run(engine.sync_adapters())

    assert set(engine.loaded) == base_loaded(on_weights)  # neither damaged version reached the engine
    assert router.live == "agentloop@v0000" and router.canary is None  # the alias falls back to the base
    assert set(router.adapters()) == base_loaded(on_weights) <= engine._synced  # ready, not 503 forever
    assert router.base_names() == ({"agentloop@v0000"} if on_weights else set())
    for m in (live, canary):
        after = manager.registry.get(m.version)
        assert after.status == "rejected" and "failed verification on an engine restart" in after.reason
    assert "truncated" in manager.registry.get(live.version).reason
    assert "weights changed since commit" in manager.registry.get(canary.version).reason
