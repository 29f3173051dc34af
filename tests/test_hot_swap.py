"""Hot swap on the real engine: promote, pin, roll back, canary, refuse bad adapters.

A "trained" adapter here is the base adapter with random B matrices: it
changes every answer, which makes it easy to see which version served a
request. Each test leaves v0000 live again for the tests after it.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from agentloop.rl.registry import AdapterRegistry
from tests.conftest import noisy_adapter


def committed_noisy(server, tmp_path, seed: int = 1):
    dst = noisy_adapter(server.adapters_root / "v0000", tmp_path / f"noisy-{seed}", seed=seed)
    reg = AdapterRegistry(server.adapters_root)
    base = reg.get("v0000")
    return reg.commit(dst, parent="v0000", base_model=base.base_model, template="chatml-tools", method="test")


def greeting(server):
    return next(s for s in server.manifest["scripts"] if s["id"] == "greeting")


def ask(server, model="agentloop", **kw):
    body = {"model": model, "messages": greeting(server)["messages"], "temperature": 0, "max_tokens": 24, **kw}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()


def engine_models(server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.engine_url}/v1/models").json()["data"]}


@pytest.fixture
def restore_base(server):
    yield
    server.admin("POST", "/admin/rollback", json={"version": "v0000"})
    server.admin("POST", "/admin/canary", json={"share": 0})


def test_admin_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer test-key"}):
        r = httpx.get(f"{server.url}/admin/adapters", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = server.admin("GET", "/admin/adapters")
    assert r.status_code == 200 and r.json()["data"][0]["version"] == "v0000"


def test_promote_pin_and_rollback(server, tmp_path, restore_base):
    expected = greeting(server)["expected"]["content"]
    m = committed_noisy(server, tmp_path)
    r = server.admin("POST", "/admin/promote", json={"version": m.version})
    assert r.status_code == 200, r.text
    body = r.json()
    generation = body["generation"]  # of the served state every gateway follows
    assert body == {"version": m.version, "previous": "v0000", "status": "live", "generation": generation}
    assert generation >= 2 and httpx.get(f"{server.url}/health").json()["served"]["generation"] == generation
    new = ask(server)
    assert new["model"] == f"agentloop@{m.version}"
    assert new["choices"][0]["message"]["content"] != expected
    # The base version stays pinnable and unchanged.
    assert ask(server, model="agentloop@v0000")["choices"][0]["message"]["content"] == expected
    models = {x["id"]: x for x in httpx.get(f"{server.base_url}/models").json()["data"]}
    assert models["agentloop"]["version"] == m.version and f"agentloop@{m.version}" in models
    listed = {a["version"]: a["status"] for a in server.admin("GET", "/admin/adapters").json()["data"]}
    assert listed[m.version] == "live" and listed["v0000"] == "retired"

    r = server.admin("POST", "/admin/rollback", json={"version": "v0000"})
    assert r.status_code == 200 and r.json()["previous"] == m.version
    back = ask(server)
    assert back["model"] == "agentloop@v0000" and back["choices"][0]["message"]["content"] == expected
    # Once idle, the replaced version is unloaded from the engine.
    deadline = time.monotonic() + 30
    while f"agentloop@{m.version}" in engine_models(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"agentloop@{m.version}" not in engine_models(server)


def test_requests_during_promotion_all_succeed_on_one_version(server, tmp_path, restore_base):
    m = committed_noisy(server, tmp_path, seed=2)

    async def stream(client, i):
        body = {"model": "agentloop", "messages": greeting(server)["messages"], "temperature": 0,
                "max_tokens": 24, "stream": True}
        models, ids, done = set(), set(), False
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    models.add(chunk["model"])
                    ids.add(chunk["id"])
                done = done or line == "data: [DONE]"
        assert done
        assert len(models) == 1 and len(ids) == 1
        return ids.pop(), models.pop()

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(stream(client, i)) for i in range(12)]
            await asyncio.sleep(0.3)
            r = await client.post(f"{server.url}/admin/promote", json={"version": m.version},
                                  headers={"Authorization": "Bearer test-admin-key"})
            assert r.status_code == 200, r.text
            tasks += [asyncio.create_task(stream(client, i)) for i in range(12, 20)]
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert len(results) == 20
    served = {model for _, model in results}
    assert served <= {"agentloop@v0000", f"agentloop@{m.version}"}
    assert f"agentloop@{m.version}" in served  # the ones started after the flip
    for cid, model in results:
        row = server.wait_row(cid)
        assert row["status_code"] == 200 and row["served_model"] == model
        assert row["version"] == model.rsplit("@", 1)[1]


def test_corrupt_or_incompatible_adapter_is_refused(server, tmp_path, restore_base):
    expected = greeting(server)["expected"]["content"]
    bad = committed_noisy(server, tmp_path, seed=3)
    weights = bad.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated after commit
    r = server.admin("POST", "/admin/promote", json={"version": bad.version})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_invalid"

    wrong = committed_noisy(server, tmp_path, seed=4)
    cfg = json.loads((wrong.path / "adapter_config.json").read_text())
    cfg["r"] = 64
    (wrong.path / "adapter_config.json").write_text(json.dumps(cfg))
    r = server.admin("POST", "/admin/promote", json={"version": wrong.version})
    assert r.status_code == 400 and "refused" in r.json()["error"]["message"]

    r = server.admin("POST", "/admin/promote", json={"version": "v0999"})
    assert r.status_code == 404
    r = server.admin("POST", "/admin/promote", content=b"{nope")
    assert r.status_code == 400
    # Nothing changed for users.
    assert ask(server)["model"] == "agentloop@v0000"
    assert ask(server)["choices"][0]["message"]["content"] == expected


def test_canary_share(server, tmp_path, restore_base):
    m = committed_noisy(server, tmp_path, seed=5)
    r = server.admin("POST", "/admin/canary", json={"version": m.version, "share": 1.0})
    assert r.status_code == 200 and r.json() == {"version": m.version, "share": 1.0}
    assert ask(server)["model"] == f"agentloop@{m.version}"
    r = server.admin("POST", "/admin/canary", json={"version": m.version, "share": 0.5})
    seen = {ask(server)["model"] for _ in range(16)}
    assert seen == {"agentloop@v0000", f"agentloop@{m.version}"}
    r = server.admin("POST", "/admin/canary", json={"share": 0})
    assert r.json() == {"version": None, "share": 0.0}
    assert {ask(server)["model"] for _ in range(4)} == {"agentloop@v0000"}
    assert server.admin("POST", "/admin/canary", json={"version": m.version, "share": 2}).status_code == 400
