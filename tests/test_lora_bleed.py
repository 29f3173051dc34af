"""The LoRA-bleed guards: requests batched with other adapters keep their own weights.

vLLM's CPU LoRA ops read the weights of a token of no adapter (index -1) from
the last adapter slot, so a bare-base request batched with LoRA requests can get
an adapter's weights. The guard: our vLLM plugin (serve/inside_vllm/lora_cpu.py)
replaces the ops with ones that give no-adapter tokens exactly zero, which is what
lets the gateway run the base version on the bare weights (serve/engine/router.py,
base_on_weights; with it off, the alias goes through the zero adapter and every
request in a batch is a LoRA request). The first test floods the engine with a
deliberately different adapter while the alias is used; the second fills every
adapter slot with such adapters and sends bare-base requests straight to the
engine beside them (it fails with vLLM's own ops: AGENTLOOP_LORA_CPU_KERNELS=0).
"""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import noisy_adapter
import pytest

pytestmark = pytest.mark.engine  # loads a real model or vLLM itself (README, "Tests")

PROBE = "bleed-probe"


def test_alias_never_gets_another_adapters_weights(server, tmp_path):
    path = noisy_adapter(server.adapters_root / "v0000", tmp_path / "probe")
    r = httpx.post(f"{server.engine_url}/v1/load_lora_adapter", json={"lora_name": PROBE, "lora_path": str(path)},
                   timeout=60)
    assert r.status_code == 200, r.text
    scripts = [s for s in server.manifest["scripts"] if s["id"] in ("greeting", "joke", "haiku")]

    async def one(client, url, model, s):
        body = {"model": model, "messages": s["messages"], "temperature": 0, "max_tokens": 40}
        resp = await client.post(f"{url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        return s, resp.json()["choices"][0]["message"]["content"]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            jobs = []
            for i in range(24):
                s = scripts[i % len(scripts)]
                if i % 2:
                    jobs.append(("probe", one(client, server.engine_url, PROBE, s)))
                else:
                    jobs.append(("alias", one(client, server.url, "agentloop", s)))
            results = await asyncio.gather(*(j for _, j in jobs))
            return [(kind, s, out) for (kind, _), (s, out) in zip(jobs, results)]

    try:
        results = asyncio.run(run())
    finally:
        httpx.post(f"{server.engine_url}/v1/unload_lora_adapter", json={"lora_name": PROBE}, timeout=60)
    alias = [(s["expected"]["content"], out) for kind, s, out in results if kind == "alias"]
    probe = [(s["expected"]["content"], out) for kind, s, out in results if kind == "probe"]
    # The probe adapter must really change outputs, or this test proves nothing.
    assert sum(exp != out for exp, out in probe) >= len(probe) // 2, probe
    bled = [(exp, out) for exp, out in alias if exp != out]
    assert not bled, f"{len(bled)}/{len(alias)} alias answers changed while batched with another adapter: {bled}"


def test_bare_base_beside_a_full_set_of_adapters_keeps_base_weights(server, tmp_path):
    """Every slot holds a noisy adapter (max_loras = 4), so whichever slot the
    reference ops would read for index -1, the bleed would show."""
    models = httpx.get(f"{server.engine_url}/v1/models", timeout=30).json()["data"]
    base = next(m["id"] for m in models if not m.get("parent"))
    names = [f"{PROBE}-{i}" for i in range(4)]
    for i, name in enumerate(names):
        path = noisy_adapter(server.adapters_root / "v0000", tmp_path / name, seed=10 + i)
        r = httpx.post(f"{server.engine_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       timeout=60)
        assert r.status_code == 200, r.text
    scripts = [s for s in server.manifest["scripts"] if s["id"] in ("greeting", "joke", "haiku")]

    async def one(client, model, s):
        body = {"model": model, "messages": s["messages"], "temperature": 0, "max_tokens": 40}
        resp = await client.post(f"{server.engine_url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        return model, s, resp.json()["choices"][0]["message"]["content"]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            # Touch every adapter first so all four slots are occupied, then mix.
            await asyncio.gather(*(one(client, n, scripts[0]) for n in names))
            jobs = [one(client, base if i % 3 == 0 else names[i % 4], scripts[i % len(scripts)]) for i in range(36)]
            return await asyncio.gather(*jobs)

    try:
        results = asyncio.run(run())
    finally:
        for name in names:
            httpx.post(f"{server.engine_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    probe = [(s["expected"]["content"], out) for model, s, out in results if model != base]
    assert sum(exp != out for exp, out in probe) >= len(probe) // 2, probe
    bled = [(exp, out) for model, s, out in results if model == base and (exp := s["expected"]["content"]) != out]
    assert not bled, f"{len(bled)} bare-base answers changed beside a full set of adapters: {bled}"
