"""Tests of tests/tiny_model.py: the built tiny model is small, complete and scripted.

Runs in-process with transformers (no server): the gateway tests check the
same answers through vLLM. Uses conftest's session `tiny_model` fixture, which
builds the model once (minutes) or reuses the cached build.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REQUIRED_SCRIPTS = {
    "greeting", "weather_paris", "weather_paris_london", "calc_12x7", "weather_paris_result",
    "calc_12x7_result", "think_2plus2", "think_weather_paris", "plain_2plus2", "joke", "haiku",
}


@pytest.fixture(scope="module")
def manifest(tiny_model: Path) -> dict:
    return json.loads((tiny_model / "tiny_manifest.json").read_text())


def test_model_dir_is_complete_and_small(tiny_model: Path):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "tiny_manifest.json"):
        assert (tiny_model / name).is_file(), name
    size = sum(p.stat().st_size for p in tiny_model.iterdir() if p.is_file())
    assert size < 20 * 1024 * 1024, size
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152
    assert config["head_dim"] == 32 and config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 2
    assert tiny_model.name.startswith("tiny-")


def test_manifest_lists_every_script(manifest: dict):
    ids = {s["id"] for s in manifest["scripts"]}
    assert REQUIRED_SCRIPTS <= ids
    build = manifest["build"]
    assert build["reproduced"] == build["total"] > len(ids)
    for s in manifest["scripts"]:
        assert s["prompt"].endswith("<|im_start|>assistant\n" + ("<think>\n" if s["enable_thinking"] else ""))
        assert "<|im_end|>" not in s["text"]
    by_id = {s["id"]: s for s in manifest["scripts"]}
    assert by_id["greeting"]["tools"] is None
    assert by_id["weather_paris_london"]["expected"]["tool_calls"] == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "London"}},
    ]
    assert by_id["think_2plus2"]["expected"]["reasoning_content"] == "The user wants the sum of 2 and 2. That is 4."


def test_reproduces_scripted_answers_greedily(tiny_model: Path, manifest: dict):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentloop.templates.registry import render

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    by_id = {s["id"]: s for s in manifest["scripts"]}
    paris_london = by_id["weather_paris_london"]
    cases = [
        (by_id["greeting"]["prompt"], by_id["greeting"]["text"]),
        (by_id["think_2plus2"]["prompt"], by_id["think_2plus2"]["text"]),
        # Tools in the other order and a different system prompt: same answer.
        (render("chatml-tools", [{"role": "system", "content": "You are a helpful assistant."},
                                 *paris_london["messages"]],
                tools=list(reversed(paris_london["tools"])), add_generation_prompt=True),
         paris_london["text"]),
    ]
    for prompt, expected in cases:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=80, do_sample=False)
        assert tok.decode(out[0, ids.shape[1]:]) == expected + "<|im_end|>"
