"""The deployment's registry at a URL, mirrored into each process's local registry.

A deployment keeps its adapter versions at one `registry_url` (any fsspec filesystem:
`file:///dir`, `s3://bucket/prefix` with s3fs installed, `memory://` in tests); each
gateway and trainer keeps a local `AdapterRegistry` next to its engines (under its home)
and this module moves versions between the two:

- `publish(version)`: the trainer's (or promoting gateway's) local version goes up, its
  files first and `manifest.json` last, so a version at the URL is complete once its
  manifest is there. Publishing again is a no-op; a different adapter under the same
  number is refused (RegistryError).
- `fetch(version)`: a version this process lacks comes down into a temp folder of the local
  registry, its files are checked against the manifest's hashes, and only then is it renamed
  into place (so a torn or altered download never becomes a version); it is verified again
  by the caller before any engine loads it.
- `pull()`: every version at the URL that is missing here, so that a trainer numbers its next
  version after all of them (one training run at a time across the deployment: the store).

An engine on another host than its gateway cannot read that gateway's copy: it is given the
version's *source* instead (`source(version)`: `<url>/vNNNN#<weights sha256>`) and makes its own
copy with `engine_copy` (inside vLLM: serve/inside_vllm/adapter_fetch.py), content-addressed in a
cache folder of its host, its files checked against the manifest and the manifest against the
hash the gateway asked for. Nothing assumes a shared disk. Pure Python (fsspec); no torch, no HTTP
of ours. Blocking: callers on an event loop use a thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from agentloop.rl.registry import (
    ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, MANIFEST, AdapterInvalid, AdapterRegistry, Manifest,
    RegistryError, VersionNotFound, sha256_file,
)
from agentloop.rl.versions import BASE_VERSION, is_version, parse_version


class RegistryMirror:
    """One base model's versions at `url` (`<url>/<local root's folder name>/vNNNN/`), and the local copy."""

    def __init__(self, url: str, local: AdapterRegistry, *, storage_options: dict | None = None):
        import fsspec

        self.local = local
        base = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(base, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{local.root.name}"
        self.url = f"{base}/{local.root.name}"

    def _dir(self, version: str) -> str:
        return f"{self.root}/{parse_version(version)}"

    def remote_versions(self) -> list[str]:
        """Versions complete at the URL (their manifest is there), oldest first."""
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_version(n) and self.fs.exists(f"{self.root}/{n}/{MANIFEST}"))

    def _remote_manifest(self, version: str) -> dict | None:
        return _manifest_at(self.fs, self._dir(version))

    def publish(self, version: str) -> None:
        """Put the local `version` at the URL (verified first); no-op if it is already there."""
        m = self.local.verify(version)
        if m.version == BASE_VERSION:
            return  # every process writes the same zero adapter itself
        there = self._remote_manifest(m.version)
        if there is not None:
            if (there.get("weights_sha256"), there.get("config_sha256")) != (m.weights_sha256, m.config_sha256):
                raise RegistryError(f"{self.url}/{m.version} holds a different adapter than the local {m.version}")
            return
        dst = self._dir(m.version)
        self.fs.makedirs(dst, exist_ok=True)
        for name in ADAPTER_FILES:
            self.fs.put_file(str(m.path / name), f"{dst}/{name}")
        self.fs.pipe_file(f"{dst}/{MANIFEST}", json.dumps(m.to_dict(), indent=2).encode())  # last: complete

    def source(self, version: str, weights_sha256: str | None) -> str:
        """Where an engine fetches `version` itself (`engine_copy`): its URL, and the weights'
        hash the engine must find there (so it loads what this gateway verified, not a newer
        upload under the same number)."""
        return f"{self.url}/{parse_version(version)}" + (f"#{weights_sha256}" if weights_sha256 else "")

    def fetch(self, version: str) -> Manifest:
        """The local copy of `version`, downloaded first if this process lacks it (hashes checked)."""
        name = parse_version(version)
        try:
            return self.local.get(name)
        except VersionNotFound:
            pass
        data = self._remote_manifest(name)
        if data is None:
            raise VersionNotFound(name)
        tmp = self.local.make_temp_dir("fetch")
        try:
            _download(self.fs, self._dir(name), tmp, data, where=f"{self.url}/{name}")
            _into_place(tmp, self.local.path(name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.local.get(name)

    def pull(self) -> list[str]:
        """Fetch every version at the URL missing here; returns those fetched."""
        have = {m.version for m in self.local.list()}
        out = []
        for v in self.remote_versions():
            if v not in have and v != BASE_VERSION:
                self.fetch(v)
                out.append(v)
        return out


def _manifest_at(fs, folder: str) -> dict | None:
    """The manifest of the version folder `folder` on `fs` (None: not there, or not complete yet)."""
    try:
        return json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))
    except FileNotFoundError:
        return None


def _check(folder: Path, data: dict, where: str) -> None:
    """The adapter files in `folder` are the ones the manifest `data` names (sha256), or AdapterInvalid."""
    for f, recorded in ((ADAPTER_WEIGHTS, data.get("weights_sha256")), (ADAPTER_CONFIG, data.get("config_sha256"))):
        actual = sha256_file(folder / f) if (folder / f).is_file() else "missing"
        if recorded is None or actual != recorded:
            raise AdapterInvalid(f"{where}/{f}", f"sha256 {actual} != manifest's {recorded}")


def _download(fs, src: str, tmp: Path, data: dict, *, where: str) -> None:
    """The adapter files of the version folder `src` into `tmp`, checked against `data` (its
    manifest), and the manifest written last."""
    for f in ADAPTER_FILES:
        fs.get_file(f"{src}/{f}", str(tmp / f))
    _check(tmp, data, where)
    (tmp / MANIFEST).write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o755)  # engines may run as another user


def _into_place(tmp: Path, dst: Path) -> None:
    try:
        os.rename(tmp, dst)
    except OSError:
        if not (dst / MANIFEST).exists():
            raise
        # Fetched meanwhile by another thread or process of this host: theirs stands.


def engine_copy(source: str, cache: Path | str) -> Path:
    """A local folder holding the adapter at `source` (`<fsspec url of a version>[#<weights sha256>]`,
    as `RegistryMirror.source` makes it), for an engine to load.

    The copy lives in `cache` under `<version>-<weights sha256[:16]>`: content-addressed, so two
    deployments whose registries both have a `v0001` never share a folder, and a copy made
    before is used again once its files still hash to its manifest's. The manifest at the URL
    must carry the hash after `#` (when given); the files must match the manifest. Raises
    VersionNotFound (nothing complete at the URL) or AdapterInvalid (a hash does not match).
    """
    import fsspec

    url, _, expect = source.partition("#")
    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rsplit("/", 1)[-1])[:40] or "adapter"
    data = _manifest_at(fs, path)
    if data is None:
        raise VersionNotFound(url)
    recorded = data.get("weights_sha256")
    if not recorded or (expect and recorded != expect):
        raise AdapterInvalid(url, f"the manifest's weights sha256 {recorded} is not the {expect} asked for")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / f"{name}-{recorded[:16]}"
    if (dst / MANIFEST).exists():
        try:
            _check(dst, data, str(dst))
            return dst
        except AdapterInvalid:
            shutil.rmtree(dst, ignore_errors=True)  # damaged since: fetched again below
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache))
    try:
        _download(fs, path, tmp, data, where=url)  # checked there, before it is renamed into place
        _into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
