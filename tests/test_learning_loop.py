"""The learning loop end to end on the real engine and real TRL training.

A simulated user prefers answers that open with "Certainly! ": for a set of
request-like prompts it corrects every other answer to that style (and
thumbs-up the ones already in it). One loop iteration (POST /admin/train)
builds the dataset from the store, trains a DPO LoRA in its own process,
gates it on held-out feedback and the tool-call regression set, and
promotes it. Then, on held-out prompts the feedback never touched, the new
live version answers in the preferred style measurably more often than the
old version (still pinnable as agentloop@v0000).
"""

from __future__ import annotations

import time

import httpx

STYLE = "Certainly! Tell me what you need."
TRAIN = ["Could you check something for me?", "Could you check this for me?", "Can you check something?",
         "Could you look at something for me?", "Could you check my work?", "Could you check a thing for me?",
         "Can you check this quickly?", "Could you please check something for me?",
         "Could you check something else for me?", "Can you check something for me please?",
         "Could you check the numbers for me?", "Could you check one thing for me?",
         "Can you please check this?", "Could you check this one for me?"]
HELD_OUT = ["Could you check something quickly?", "Can you check this for me?", "Could you check it for me?",
            "Can you look at something for me?", "Could you check something for us?",
            "Could you check that for me?"]
PARAMS = {
    "eval_percent": 30,
    "min_train_examples": 4,
    # Small and fast on the 6.6M-parameter test model; measured to move it without breaking it.
    "train": {"learning_rate": 2e-3, "max_steps": 16, "per_device_train_batch_size": 2, "max_length": 256},
    "gate": {"min_accuracy_gain": 0.5, "min_eval_pairs": 2},
}


def answer(server, prompt: str, model: str = "agentloop", key: str = "user-key") -> dict:
    r = httpx.post(f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": prompt}],
                         "temperature": 0, "max_tokens": 16})
    r.raise_for_status()
    return r.json()


def styled(server, prompts, model) -> int:
    return sum(answer(server, p, model)["choices"][0]["message"]["content"].startswith("Certainly! ")
               for p in prompts)


def test_one_iteration_learns_the_users_preference(server):
    before = styled(server, HELD_OUT, "agentloop@v0000")
    sent = 0
    for prompt in TRAIN:
        r = answer(server, prompt)
        text = r["choices"][0]["message"]["content"]
        body = ({"completion_id": r["id"], "type": "thumbs", "value": 1} if text.startswith("Certainly! ") else
                {"completion_id": r["id"], "type": "correction",
                 "correction": {"role": "assistant", "content": STYLE}})
        fb = httpx.post(f"{server.base_url}/feedback", json=body, headers={"Authorization": "Bearer user-key"})
        assert fb.status_code == 200, fb.text
        sent += body["type"] == "correction"
    assert sent >= 8, "the base model already prefers the style; the test would prove nothing"

    r = server.admin("POST", "/admin/train", json={"params": PARAMS})
    assert r.status_code == 200, r.text
    run_id = r.json()["id"]
    # Only one training at a time.
    again = server.admin("POST", "/admin/train", json={"params": PARAMS})
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_in_progress"

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        run = server.admin("GET", f"/admin/runs/{run_id}").json()
        if run["status"] not in ("queued", "running"):
            break
        time.sleep(2)
    try:
        assert run["status"] == "promoted", run
        gate = run["gate"]
        assert gate["passed"] and gate["preference"]["candidate"]["n"] >= 2
        assert gate["preference"]["candidate"]["accuracy"] >= gate["preference"]["live"]["accuracy"] + 0.5
        assert gate["tool_validity"]["candidate"]["validity"] >= gate["tool_validity"]["live"]["validity"]
        assert run["metrics"] and "loss" in run["metrics"][0]
        assert run["dataset"]["train"] >= 4
        phases = run["result"]["phase_seconds"]  # where the iteration's time went
        assert set(phases) == {"sampling", "dataset", "train_job", "gate", "promotion"} and all(v >= 0 for v in phases.values())
        assert phases["train_job"] >= run["result"]["train_seconds"]
        # The preference check ran inside the training job, on the model it had loaded.
        assert gate["seconds"]["preference"] > 0 and "gate_preference" not in run["result"]
        version = run["version"]
        adapters = {a["version"]: a for a in server.admin("GET", "/admin/adapters").json()["data"]}
        assert adapters[version]["status"] == "live" and adapters[version]["parent"] == "v0000"

        after = styled(server, HELD_OUT, "agentloop")
        assert answer(server, HELD_OUT[0])["model"] == f"agentloop@{version}"
        # Held-out prompts in the preferred style: at least 3 more of 6 than before (measured: 2 -> 6).
        assert after >= before + 3, f"preferred style on held-out prompts: before {before}/6, after {after}/6"
    finally:
        server.admin("POST", "/admin/rollback", json={"version": "v0000"})
