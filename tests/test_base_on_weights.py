"""The base version runs on the engine's bare weights: no adapter, no LoRA cost (issue 34).

Owns: while `v0000` is live (and for a pinned `agentloop@v0000`) the engine holds no adapter
for it and runs the request as its base model, yet the client and the log see the served
name, streamed and not; the answers are the base model's own. A promoted adapter and the
base share a batch without bleed (tests/test_lora_bleed.py), and a rollback to the base
loads nothing (tests/test_faults_trainer.py).
"""

from __future__ import annotations

import json

import httpx

from tests.conftest import Server


def script(server: Server, sid: str) -> dict:
    return next(s for s in server.manifest["scripts"] if s["id"] == sid)


def engine_models(server: Server) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{server.engine_url}/v1/models", timeout=10).json()["data"]}


def test_no_adapter_is_loaded_for_the_base(server):
    models = engine_models(server)
    assert "agentloop@v0000" not in models  # nothing to load: the base runs on the weights
    base = [m for m in models.values() if m.get("parent") is None]
    assert [m["id"] for m in base] == ["agentloop-base"]
    served = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}
    assert {"agentloop", "agentloop@v0000"} <= served


def test_base_requests_answer_as_the_base_model_under_the_served_name(server):
    s = script(server, "greeting")
    body = {"messages": s["messages"], "temperature": 0, "max_tokens": 40}
    direct = httpx.post(f"{server.engine_url}/v1/chat/completions", timeout=120,
                        json={**body, "model": "agentloop-base"}).json()
    for model in ("agentloop", "agentloop@v0000"):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={**body, "model": model})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "agentloop@v0000"
        assert out["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"] \
            == s["expected"]["content"]
        row = server.wait_row(out["id"])
        assert (row["version"], row["served_model"]) == ("v0000", "agentloop@v0000")


def test_a_streamed_base_request_carries_the_served_name(server):
    s = script(server, "joke")
    body = {"model": "agentloop", "messages": s["messages"], "temperature": 0, "max_tokens": 40, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks and {c["model"] for c in chunks} == {"agentloop@v0000"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == s["expected"]["content"]
