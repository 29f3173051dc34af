"""Numbered LoRA adapter versions of one base model: `v0000`, `v0001`, ... folders under one root.

Owns: the folders `<root>/vNNNN/` (each `adapter_config.json`,
`adapter_model.safetensors`, `manifest.json`), the validation of an adapter
folder before it may become a version, and the status of every version
(`candidate`, `live`, `rejected`, `retired`; usually candidate -> live or
rejected, live -> retired when superseded, any -> live for a rollback).
The pattern is OpenPipe ART's numbered checkpoint folders: training writes
elsewhere, a finished adapter appears here in one `os.rename`, and which
version serves changes in one call, `set_status(v, "live")`.

Invariants:
  * A `vNNNN` folder exists only complete and valid: it is assembled in a
    `.tmp-*` folder inside `root` and renamed into place; the number is taken
    under an exclusive file lock, so concurrent committers never collide.
  * `manifest.json` is only ever replaced whole (temp file + `os.replace`),
    under the same lock (status changes are read-modify-write).
  * At most one version is `live` once `set_status(..., "live")` returns; it
    retires the previous live version only after the new one is marked, so a
    crash in between leaves two marked live and `live()` picks the one
    promoted last (never none).
  * `.tmp-*` leftovers of killed processes are invisible to `list()` and
    removed by `gc()` once their owner process is gone.

Pure Python plus numpy (the gateway may import this; no torch, no HTTP).
Errors are the exception classes below; callers map them to responses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from agentloop.rl.lora_shapes import projection_shapes
from agentloop.rl.versions import is_version, next_version, parse_version, version_number

__all__ = [
    "AdapterRegistry", "Manifest", "AdapterInfo", "validate_adapter", "sha256_file",
    "RegistryError", "AdapterInvalid", "VersionNotFound", "InvalidStatus",
    "STATUSES", "ADAPTER_FILES", "DEFAULT_MAX_RANK",
]

STATUSES = ("candidate", "live", "rejected", "retired")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MANIFEST = "manifest.json"
LOCK = ".registry.lock"
TMP_PREFIX = ".tmp-"
DEFAULT_MAX_RANK = 16  # the engine's --max-lora-rank
_CHUNK = 1 << 20
# A foreign host's temp dir can't be checked for a live owner; it is only collected when this old.
_FOREIGN_TMP_AGE = 24 * 3600.0


class RegistryError(Exception):
    """Base class of registry errors."""


class AdapterInvalid(RegistryError):
    """An adapter folder is not a usable LoRA adapter; the message says why."""

    def __init__(self, path: Path | str, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"invalid adapter {path}: {reason}")


class VersionNotFound(RegistryError, KeyError):
    def __init__(self, version: str):
        self.version = version
        super().__init__(version)

    def __str__(self) -> str:
        return f"no adapter version {self.version!r}"


class InvalidStatus(RegistryError, ValueError):
    """An unknown status name."""


# ---------------------------------------------------------------- validation

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter folder."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    modules: int           # adapted module instances (e.g. 4 projections x 30 layers)
    tensors: int
    weights_sha256: str
    config_sha256: str


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file and where its data starts; checks the file is complete."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterInvalid(path.parent, f"{path.name} is truncated ({size} bytes)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8 or n > 100 << 20:
            raise AdapterInvalid(path.parent,
                                 f"{path.name} is truncated or corrupt (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise AdapterInvalid(path.parent, f"{path.name} has an unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterInvalid(path.parent, f"{path.name} header is not a table")
    header.pop("__metadata__", None)
    start, end = 8 + n, 0
    for name, t in header.items():
        try:
            dtype, shape, (a, b) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterInvalid(path.parent, f"{path.name}: malformed entry for tensor {name!r}") from None
        if dtype not in _DTYPE_BYTES:
            raise AdapterInvalid(path.parent, f"{path.name}: tensor {name!r} has non-float dtype {dtype}")
        if b - a != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise AdapterInvalid(path.parent, f"{path.name}: tensor {name!r} data size does not match shape {shape}")
        end = max(end, b)
    if start + end != size:
        raise AdapterInvalid(
            path.parent, f"{path.name} is truncated or corrupt: tensors need {start + end} bytes, file has {size}")
    return header, start


def _tensor_values(data: np.ndarray, start: int, t: dict) -> np.ndarray:
    """A tensor's values as a flat float array, from the file mapped as bytes."""
    a, b = t["data_offsets"]
    raw = data[start + a:start + b]
    if t["dtype"] == "BF16":  # numpy has no bfloat16: widen the bits into float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[t["dtype"]])


def _module_matches(module_path: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches the path or its last dotted names."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_path) is not None
    return any(module_path == t or module_path.endswith("." + t) for t in target_modules)


def validate_adapter(path: Path | str, *, max_rank: int = DEFAULT_MAX_RANK,
                     base_model_dir: Path | str | None = None) -> AdapterInfo:
    """Check that `path` holds a loadable PEFT LoRA adapter; raise AdapterInvalid naming the first problem.

    Checks: the config parses and is LORA with 1 <= r <= max_rank (rank_pattern
    too) and non-empty target_modules; the safetensors file is complete, every
    tensor is a lora_A/lora_B weight of a targeted module, each module has both
    with shapes (r, in) and (out, r), values are finite; and when the base
    model's config.json is at hand, layer indices and in/out features fit it.
    """
    path = Path(path)
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not path.is_dir():
        raise AdapterInvalid(path, "not a directory")
    if not cfg_path.is_file():
        raise AdapterInvalid(path, f"missing {ADAPTER_CONFIG}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise AdapterInvalid(path, f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterInvalid(path, f"{ADAPTER_CONFIG} is not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise AdapterInvalid(path, f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterInvalid(path, f"rank r={r!r} is not a positive integer")
    ranks = {"": r, **(cfg.get("rank_pattern") or {})}
    too_big = {k or "r": v for k, v in ranks.items() if v > max_rank}
    if too_big:
        raise AdapterInvalid(path, f"rank {too_big} exceeds the maximum LoRA rank {max_rank}")
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, (list, str)):
        raise AdapterInvalid(path, f"target_modules is {targets!r}: no modules to adapt")
    if cfg.get("use_dora"):
        raise AdapterInvalid(path, "DoRA adapters are not servable by the engine")
    if not w_path.is_file():
        raise AdapterInvalid(path, f"missing {ADAPTER_WEIGHTS}")
    header, start = _read_safetensors_header(w_path)
    if not header:
        raise AdapterInvalid(path, f"{ADAPTER_WEIGHTS} holds no tensors")

    base_shapes, n_layers = None, None
    if base_model_dir is not None and (Path(base_model_dir) / "config.json").is_file():
        base_cfg = json.loads((Path(base_model_dir) / "config.json").read_text())
        base_cfg = base_cfg.get("text_config", base_cfg)
        if "hidden_size" in base_cfg and "num_attention_heads" in base_cfg:
            base_shapes, n_layers = projection_shapes(base_cfg), base_cfg.get("num_hidden_layers")

    modules: dict[str, dict[str, list[int]]] = {}
    data = np.memmap(w_path, dtype=np.uint8, mode="r")
    for name, t in header.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if not m:
            raise AdapterInvalid(path, f"tensor {name!r} is not a LoRA A/B weight (modules_to_save is not servable)")
        module, ab = m.group(1), m.group(2)
        if ab in modules.setdefault(module, {}):
            raise AdapterInvalid(path, f"module {module!r} has two lora_{ab} tensors")
        modules[module][ab] = t["shape"]
        if not np.isfinite(_tensor_values(data, start, t)).all():
            raise AdapterInvalid(path, f"tensor {name!r} has NaN or infinite values")

    for module, ab in sorted(modules.items()):
        rel = module.removeprefix("base_model.model.")
        if not _module_matches(rel, targets):
            raise AdapterInvalid(path, f"module {rel!r} has weights but is not in target_modules {targets!r}")
        if set(ab) != {"A", "B"}:
            raise AdapterInvalid(path, f"module {rel!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        (ra, fan_in), (fan_out, rb) = ab["A"], ab["B"]
        want = next((v for k, v in ranks.items() if k and _module_matches(rel, k)), r)
        if ra != rb or ra != want:
            raise AdapterInvalid(
                path, f"module {rel!r}: lora_A {ab['A']} / lora_B {ab['B']} do not match rank {want} of the config")
        leaf = rel.rsplit(".", 1)[-1]
        if base_shapes is not None:
            layer = _LAYER_RE.search(rel)
            if layer and n_layers is not None and int(layer.group(1)) >= n_layers:
                raise AdapterInvalid(path, f"module {rel!r}: the base model has only {n_layers} layers")
            if leaf in base_shapes and (fan_in, fan_out) != base_shapes[leaf]:
                raise AdapterInvalid(
                    path, f"module {rel!r}: shape (in={fan_in}, out={fan_out}) does not fit the base model's "
                          f"{leaf} (in={base_shapes[leaf][0]}, out={base_shapes[leaf][1]})")
    if isinstance(targets, list):
        leaves = {m.removeprefix("base_model.model.").rsplit(".", 1)[-1] for m in modules}
        missing = [t for t in targets if t not in leaves and not any(m.endswith("." + t) for m in modules)]
        if missing:
            raise AdapterInvalid(path, f"target modules {missing} have no weights in {ADAPTER_WEIGHTS}")
    return AdapterInfo(r=r, lora_alpha=cfg.get("lora_alpha", r), target_modules=targets, modules=len(modules),
                       tensors=len(header), weights_sha256=sha256_file(w_path), config_sha256=sha256_file(cfg_path))


# ---------------------------------------------------------------- manifest

def _iso(t: float) -> str:
    # Microseconds: two status changes in one second must still order.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


@dataclass
class Manifest:
    version: str
    parent: str | None
    base_model: str
    status: str
    template: str | None = None
    method: str | None = None
    dataset_ids: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    config_sha256: str | None = None
    adapter: dict = field(default_factory=dict)   # r, lora_alpha, target_modules
    reason: str = ""
    created_at: str | None = None
    history: list = field(default_factory=list)   # [{status, reason, at}], oldest first
    path: Path | None = field(default=None, compare=False)  # the version folder; not stored

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> "Manifest":
        """Tolerant: v0000 is written by rl/zero_adapter.py with only version/parent/base_model/status/reason."""
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        m = cls(**{k: v for k, v in d.items() if k in known}, path=path)
        if not m.history:
            m.history = [{"status": m.status, "reason": m.reason, "at": m.created_at}]
        return m

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d

    @property
    def number(self) -> int:
        return version_number(self.version)

    def promoted_at(self) -> str:
        """When this version last became live ('' if never): orders two 'live' ones after a crash."""
        return max((h.get("at") or "" for h in self.history if h.get("status") == "live"), default="")


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- registry

class AdapterRegistry:
    """The versions of one base model's adapters (e.g. `<home>/adapters/<model-slug>/`)."""

    def __init__(self, root: Path | str, *, max_rank: int = DEFAULT_MAX_RANK):
        self.root = Path(root)
        self.max_rank = max_rank
        self.root.mkdir(parents=True, exist_ok=True)

    # -- locking and temp dirs

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / LOCK, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def make_temp_dir(self, purpose: str = "work") -> Path:
        """A scratch folder inside root (same filesystem, so a rename into place is atomic).

        Named after host and pid, so `gc()` can tell a dead owner's leftovers from live work.
        """
        host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:20] or "host"
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{purpose}-{host}-{os.getpid()}-", dir=self.root))

    def _tmp_dead(self, p: Path) -> bool:
        m = re.match(rf"^{re.escape(TMP_PREFIX)}[^-]+-([A-Za-z0-9]*)-(\d+)-", p.name)
        host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:20] or "host"
        if m and m.group(1) == host:
            return not _pid_alive(int(m.group(2)))
        try:
            return time.time() - p.stat().st_mtime > _FOREIGN_TMP_AGE
        except OSError:
            return False

    def gc(self) -> list[Path]:
        """Remove temp folders whose owner process is gone, and manifest temp files of
        interrupted rewrites (those are only written under the lock we hold); returns what went."""
        removed = []
        with self._lock():
            for p in self.root.glob(f"{TMP_PREFIX}*"):
                if p.is_dir() and self._tmp_dead(p):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
            for p in self.root.glob(f"v*/.{MANIFEST}.*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
        return removed

    # -- reading

    def _numbers(self) -> list[int]:
        """Every taken number, including a numbered folder without a manifest (never reuse it)."""
        return sorted(version_number(p.name) for p in self.root.iterdir() if is_version(p.name))

    def next_version(self) -> str:
        return next_version(self._numbers())

    @staticmethod
    def _name(version: str | int) -> str:
        try:
            return parse_version(version)  # also the served name "agentloop@v0003"
        except ValueError:
            raise VersionNotFound(str(version)) from None

    def path(self, version: str | int) -> Path:
        return self.root / self._name(version)

    def get(self, version: str | int) -> Manifest:
        p = self.path(version)
        try:
            data = json.loads((p / MANIFEST).read_text())
        except FileNotFoundError:
            raise VersionNotFound(self._name(version)) from None
        except ValueError as exc:
            raise RegistryError(f"{p / MANIFEST} is unreadable: {exc}") from None
        return Manifest.from_dict(data, path=p)

    def list(self) -> list[Manifest]:
        out = []
        for n in self._numbers():
            with contextlib.suppress(VersionNotFound, RegistryError):
                out.append(self.get(n))
        return out

    def trained_feedback_ids(self, version: str | int) -> list[str]:
        """Every feedback id that went into `version` and its ancestors (parent links, oldest last)."""
        ids: set[str] = set()
        seen: set[str] = set()
        m: Manifest | None = self.get(version)
        while m is not None and m.version not in seen:  # a cycle cannot happen, but must not hang
            seen.add(m.version)
            ids.update(str(i) for i in m.dataset_ids)
            m = self.get(m.parent) if m.parent else None
        return sorted(ids)

    def live(self) -> Manifest | None:
        lives = [m for m in self.list() if m.status == "live"]
        return max(lives, key=lambda m: (m.promoted_at(), m.number)) if lives else None

    # -- writing

    def commit(self, src_dir: Path | str, *, parent: str | None, base_model: str, template: str | None = None,
               dataset_ids: list | None = None, metrics: dict | None = None, method: str | None = None,
               status: str = "candidate", reason: str = "", move: bool = False) -> Manifest:
        """Validate the adapter in `src_dir` and make it the next version; returns its manifest.

        The adapter files are copied into a temp folder in root, hashed and
        validated there (so what is checked is what lands), then renamed to
        the next free number under the lock. With `move`, `src_dir` is removed
        afterwards.
        """
        src_dir = Path(src_dir)
        if status not in STATUSES or status == "live":
            raise InvalidStatus(f"a new version starts as candidate/rejected, not {status!r}")
        if parent is not None:
            self.get(parent)  # must exist
        validate_adapter(src_dir, max_rank=self.max_rank, base_model_dir=_local_dir(base_model))
        tmp = self.make_temp_dir("commit")
        try:
            for name in ADAPTER_FILES:
                shutil.copyfile(src_dir / name, tmp / name)
                # On disk before the rename publishes them: after a machine crash (not
                # only a killed process) a version must never hold empty or torn files.
                _fsync_file(tmp / name)
            info = validate_adapter(tmp, max_rank=self.max_rank, base_model_dir=_local_dir(base_model))
            now = _iso(time.time())
            manifest = Manifest(
                version="", parent=self._name(parent) if parent is not None else None, base_model=str(base_model),
                status=status, template=template, method=method, dataset_ids=list(dataset_ids or []),
                metrics=dict(metrics or {}), weights_sha256=info.weights_sha256, config_sha256=info.config_sha256,
                adapter={"r": info.r, "lora_alpha": info.lora_alpha, "target_modules": info.target_modules},
                reason=reason, created_at=now, history=[{"status": status, "reason": reason, "at": now}],
            )
            with self._lock():
                manifest.version = self.next_version()
                _write_json_atomic(tmp / MANIFEST, manifest.to_dict())
                _fsync_dir(tmp)  # the three names themselves, before the folder is renamed into place
                os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; engines may run as another user
                target = self.root / manifest.version
                os.rename(tmp, target)  # the number is free: taken under the lock, never reused
                _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if move:
            shutil.rmtree(src_dir, ignore_errors=True)
        manifest.path = target
        return manifest

    def set_status(self, version: str | int, status: str, reason: str = "") -> Manifest:
        """Change a version's status (manifest replaced atomically). Making one live
        verifies it first and retires the previous live version."""
        if status not in STATUSES:
            raise InvalidStatus(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        if status == "live":
            self.verify(version)
        with self._lock():
            m = self._set(version, status, reason)
            if status == "live":
                for other in self.list():
                    if other.status == "live" and other.version != m.version:
                        self._set(other.version, "retired", f"superseded by {m.version}")
        return m

    def _set(self, version: str | int, status: str, reason: str) -> Manifest:
        m = self.get(version)
        m.status, m.reason = status, reason
        m.history.append({"status": status, "reason": reason, "at": _iso(time.time())})
        _write_json_atomic(m.path / MANIFEST, m.to_dict())
        return m

    def verify(self, version: str | int) -> Manifest:
        """Re-validate a version and re-hash its files against the manifest (before promotion).

        A manifest with no recorded hash (v0000 from rl/zero_adapter.py) can
        only be validated, not compared.
        """
        m = self.get(version)
        info = validate_adapter(m.path, max_rank=self.max_rank, base_model_dir=_local_dir(m.base_model))
        for label, recorded, actual in (("weights", m.weights_sha256, info.weights_sha256),
                                        ("config", m.config_sha256, info.config_sha256)):
            if recorded is not None and recorded != actual:
                raise AdapterInvalid(m.path, f"{label} changed since commit: sha256 {actual} != recorded {recorded}")
        return m


def _local_dir(model: str | Path | None) -> Path | None:
    if model is None:
        return None
    p = Path(model).expanduser()
    return p if p.is_dir() else None
