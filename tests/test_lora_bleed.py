"""The LoRA-bleed guard: alias requests batched with other adapters keep base outputs.

vLLM's CPU LoRA kernels have a reported bug where a bare-base request batched
with LoRA requests can get an adapter's weights. The gateway routes its alias
through a zero-initialised adapter so every request in a batch is a LoRA
request. This test loads a deliberately different adapter straight into the
engine, floods the engine with it while the gateway's alias is used
concurrently, and checks every alias answer is still the base model's.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import noisy_adapter

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
