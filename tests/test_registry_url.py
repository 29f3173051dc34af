"""The deployment's registry at a URL (rl/registry_url.py): versions published by one process,
fetched by another into its own local registry, hashes checked; on fsspec's in-memory
filesystem and on a file:// folder."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agentloop.rl.registry import AdapterInvalid, AdapterRegistry, RegistryError, VersionNotFound
from agentloop.rl.registry_url import RegistryMirror
from agentloop.rl.zero_adapter import write_zero_adapter
from agentloop.serve.settings import Settings
from tests.test_served_state import registry_with_versions


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path) -> str:
    if request.param == "memory":
        return f"memory://agentloop-{uuid.uuid4().hex[:8]}"
    return (tmp_path / "deployment").as_uri()


def other_host(tmp_path: Path, root: Path, base: Path) -> AdapterRegistry:
    """A second process's local registry: only its own zero adapter."""
    reg = AdapterRegistry(tmp_path / "other" / root.name)
    write_zero_adapter(base, reg.root / "v0000")
    return reg


def test_published_versions_are_fetched_with_their_hashes(tmp_path, url):
    root, base, (v1, v2) = registry_with_versions(tmp_path)
    up = RegistryMirror(url, AdapterRegistry(root))
    down_reg = other_host(tmp_path, root, base)
    down = RegistryMirror(url, down_reg)
    assert up.remote_versions() == []
    with pytest.raises(VersionNotFound):
        down.fetch(v1)
    up.publish("v0000")  # every process writes its own: never published
    up.publish(v1)
    up.publish(v1)  # again: a no-op
    assert up.remote_versions() == [v1]
    m = down.fetch(v1)
    assert m.path == down_reg.path(v1) and down_reg.verify(v1).weights_sha256 == AdapterRegistry(root).get(v1).weights_sha256
    up.publish(v2)
    assert down.pull() == [v2] and down.pull() == []
    assert [x.version for x in down_reg.list()] == ["v0000", v1, v2]
    assert down_reg.next_version() == AdapterRegistry(root).next_version()  # numbered after all of them


def test_a_different_adapter_under_a_taken_number_is_refused(tmp_path, url):
    root, base, (v1, v2) = registry_with_versions(tmp_path)
    RegistryMirror(url, AdapterRegistry(root)).publish(v1)
    # Another process committed its own v0001 (v2's weights) without pulling first: refused.
    other = other_host(tmp_path, root, base)
    mine = other.commit(root / v2, parent="v0000", base_model=str(base), method="dpo")
    assert mine.version == v1
    with pytest.raises(RegistryError, match="different adapter"):
        RegistryMirror(url, other).publish(v1)


def test_an_altered_or_torn_download_never_becomes_a_version(tmp_path):
    root, base, (v1, v2) = registry_with_versions(tmp_path)
    url = (tmp_path / "deployment").as_uri()
    RegistryMirror(url, AdapterRegistry(root)).publish(v1)
    RegistryMirror(url, AdapterRegistry(root)).publish(v2)
    remote = tmp_path / "deployment" / root.name
    (remote / v1 / "adapter_config.json").write_text((remote / v1 / "adapter_config.json").read_text() + " ")
    (remote / v2 / "manifest.json").unlink()  # an upload that stopped before its manifest: not there yet
    down_reg = other_host(tmp_path, root, base)
    down = RegistryMirror(url, down_reg)
    with pytest.raises(AdapterInvalid, match="sha256"):
        down.fetch(v1)
    with pytest.raises(VersionNotFound):
        down.fetch(v2)
    assert [m.version for m in down_reg.list()] == ["v0000"] and not list(down_reg.root.glob(".tmp-*"))


def test_the_setting_takes_fsspec_urls_only():
    assert Settings(registry_url="file:///srv/registry").registry_url == "file:///srv/registry"
    assert Settings(registry_url="/srv/registry").registry_url == "/srv/registry"
    with pytest.raises(ValueError, match="registry_url"):
        Settings(registry_url="nosuchfs://bucket/x")


@pytest.mark.parametrize("flags, needle", [
    (["--registry-url", "nosuchfs://bucket/x"], "registry_url"),
    (["--engine-dtype", "fp8"], "engine_dtype"),
])
def test_serve_refuses_a_bad_setting_in_one_line(tmp_path, monkeypatch, capsys, flags, needle):
    from agentloop.serve.cli.main import main

    monkeypatch.setenv("AGENTLOOP_HOME", str(tmp_path))
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"agentloop: {needle}:") and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "agentloop.db").exists()  # nothing was started


def test_an_engine_makes_its_own_copy_from_a_versions_source(tmp_path, url):
    """An engine on another host (engine_copy, run by serve/inside_vllm/adapter_fetch.py): a
    content-addressed copy of the version the source names, checked like a gateway's fetch."""
    from agentloop.rl.registry_url import engine_copy

    root, base, (v1, v2) = registry_with_versions(tmp_path)
    reg = AdapterRegistry(root)
    up = RegistryMirror(url, reg)
    cache = tmp_path / "engine-cache"
    with pytest.raises(VersionNotFound):
        engine_copy(up.source(v1, reg.get(v1).weights_sha256), cache)
    up.publish(v1)
    up.publish(v2)
    w1 = reg.get(v1).weights_sha256
    src = up.source(v1, w1)
    assert src == f"{up.url}/{v1}#{w1}"
    got = engine_copy(src, cache)
    assert got.parent == cache and got.name == f"{v1}-{w1[:16]}"
    assert (got / "adapter_model.safetensors").read_bytes() == (reg.path(v1) / "adapter_model.safetensors").read_bytes()
    # Asked again: the same folder, not downloaded again (its files still match).
    stamp = (got / "adapter_model.safetensors").stat().st_mtime_ns
    assert engine_copy(src, cache) == got and (got / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # Without a hash asked for, the manifest's names the folder.
    assert engine_copy(f"{up.url}/{v1}", cache) == got
    # A copy damaged since is fetched again.
    (got / "adapter_model.safetensors").write_bytes(b"damaged")
    assert engine_copy(src, cache) == got
    assert (got / "adapter_model.safetensors").read_bytes() == (reg.path(v1) / "adapter_model.safetensors").read_bytes()
    # The URL holds another adapter than the one the gateway verified: refused, nothing copied.
    with pytest.raises(AdapterInvalid, match="asked for"):
        engine_copy(up.source(v2, w1), cache)
    assert sorted(p.name for p in cache.iterdir()) == [got.name]


def test_an_engine_refuses_an_altered_upload(tmp_path):
    from agentloop.rl.registry_url import engine_copy

    root, base, (v1, _) = registry_with_versions(tmp_path)
    reg = AdapterRegistry(root)
    up = RegistryMirror((tmp_path / "deployment").as_uri(), reg)
    up.publish(v1)
    remote = tmp_path / "deployment" / root.name / v1
    (remote / "adapter_model.safetensors").write_bytes(b"not the adapter")
    cache = tmp_path / "engine-cache"
    with pytest.raises(AdapterInvalid, match="sha256"):
        engine_copy(up.source(v1, reg.get(v1).weights_sha256), cache)
    assert list(cache.iterdir()) == []  # no folder, no temp left
