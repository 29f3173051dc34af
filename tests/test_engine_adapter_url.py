"""Adapters by URL inside the real vLLM engine (serve/inside_vllm/adapter_fetch.py): an engine
given a registry version's source (`<url>/vNNNN#<weights sha256>`) loads its own copy from the
URL, checked against the manifest and the hash asked for, so an engine on another host than its
gateway needs no shared disk; a missing version is a 404 and an altered one a 400, nothing loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from agentloop.rl.registry import AdapterRegistry
from agentloop.rl.registry_url import RegistryMirror
from tests.conftest import noisy_adapter


def _published(server, tmp_path: Path) -> tuple[RegistryMirror, str, str]:
    """A trainer's registry (its own folder) with one trained version published at a file:// URL."""
    (base_v0,) = server.home.glob("adapters/*/v0000")
    reg = AdapterRegistry(tmp_path / "trainer" / base_v0.parent.name)
    shutil.copytree(base_v0, reg.root / "v0000")
    m = reg.commit(noisy_adapter(base_v0, tmp_path / "noisy", seed=7), parent="v0000",
                   base_model=reg.get("v0000").base_model, method="test")
    mirror = RegistryMirror((tmp_path / "deployment").as_uri(), reg)
    mirror.publish(m.version)
    return mirror, m.version, m.weights_sha256


def test_an_engine_loads_a_version_from_its_url(server, tmp_path):
    mirror, version, sha = _published(server, tmp_path)
    name = f"urltest@{version}"
    with httpx.Client(base_url=server.engine_url, timeout=120) as c:
        # Nothing at that URL yet, and another adapter than the one asked for: refused, nothing loaded.
        r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": mirror.source("v0099", sha)})
        assert r.status_code == 404 and "No adapter at" in r.text, r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": mirror.source(version, "0" * 64)})
        assert r.status_code == 400 and "asked for" in r.text, r.text
        assert name not in {m["id"] for m in c.get("/v1/models").json()["data"]}

        r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": mirror.source(version, sha)})
        assert r.status_code == 200, r.text
        try:
            card = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == name)
            root = Path(card["root"])
            # The engine's own copy, content-addressed, not the trainer's folder.
            assert root.name == f"{version}-{sha[:16]}" and root.parent.name.startswith("engine-adapters")
            assert (root / "adapter_model.safetensors").read_bytes() == \
                (mirror.local.path(version) / "adapter_model.safetensors").read_bytes()
            r = c.post("/v1/chat/completions", json={"model": name, "max_tokens": 2, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["model"] == name, r.text
        finally:
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
