"""The web UI (serve/http/ui.py, serve/ui/): the chat page and the loop dashboard.

Two layers. In-process tests (fake engine, milliseconds) pin the HTTP contract:
the admin login and its session cookie, `/admin` for scripts, static files,
the missing-Chart.js message and `GET /admin/stats`. Browser tests drive the
real pages in headless Chromium (Debian's /usr/bin/chromium through
Playwright) against the real gateway and vLLM engine of the `server` fixture:
stream an answer, give every kind of feedback and find its row in the store,
see thinking and tool calls, log in to the dashboard and see its charts.
Screenshots of each page go to artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from agentloop.serve.http import admin_auth as admin
from agentloop.serve.http import ui
from agentloop.serve.http import app as app_module
from agentloop.serve.errors import NotFound
from agentloop.serve.settings import Settings
from agentloop.serve.store.db import Store
from tests.conftest import ADMIN_KEY, ROOT, free_port, stop_gateway
from tests.test_gateway_unit import FakeEngine

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "artifacts" / "ui"
USER_KEY = "ui-test-user-key"
GREETING = "Hello! How can I help you today?"
TIMEOUT_MS = 60_000  # a CPU engine shared with the rest of the suite can be slow to start answering


# ---------------------------------------------------------------- in-process (fake engine)

@pytest.fixture
def app_client(tmp_path, monkeypatch):
    app = app_module.create_app(Settings(home=tmp_path, admin_key=ADMIN_KEY), engines=[FakeEngine()])
    # The lead wires ui.router into serve/http/app.py; until then, include it here.
    if not any(getattr(r, "path", None) == "/admin/stats" for r in app.routes):
        app.include_router(ui.router)
    with TestClient(app) as c:
        app.state.gw.router.add_version("v0000", str(tmp_path / "adapters" / "v0000"), live=True)
        yield c


def test_login_sets_a_strict_httponly_cookie_that_admin_routes_accept(app_client):
    c = app_client
    r = c.post("/admin/login", data={"key": "not-the-key"}, follow_redirects=False)
    assert r.status_code == 401 and "Wrong admin key" in r.text and "set-cookie" not in r.headers
    r = c.post("/admin/login", json={"key": "not-the-key"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    r = c.post("/admin/login", data={"key": ADMIN_KEY}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{admin.SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/admin" in cookie
    assert ADMIN_KEY not in cookie  # derived from the key, never the key itself

    assert c.get("/admin/runs").status_code == 200  # the cookie alone authenticates
    assert c.get("/admin/stats").status_code == 200
    # A Bearer header decides alone: a script's wrong key is not rescued by a cookie.
    assert c.get("/admin/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # Writes with the cookie must come from the gateway's own origin.
    r = c.post("/admin/canary", json={"share": 0}, headers={"Origin": "http://localhost:9999"})
    assert r.status_code == 403 and "Cross-origin" in r.json()["error"]["message"]

    c.post("/admin/logout", follow_redirects=False)
    assert c.get("/admin/runs").status_code == 401


def test_session_cookie_is_bound_to_the_key_and_expires():
    now = time.time()
    good = admin.session_token(ADMIN_KEY, int(now) + 60)
    assert admin.session_valid(good, ADMIN_KEY, now)
    assert not admin.session_valid(good, "another-admin-key", now)  # a new key ends every session
    assert not admin.session_valid(good, ADMIN_KEY, now + 61)
    expires, mac = good.split(".")
    assert not admin.session_valid(f"{int(expires) + 3600}.{mac}", ADMIN_KEY, now)  # extended by hand
    for junk in (None, "", "abc", "123", "123.", ".abc", good + "0"):
        assert not admin.session_valid(junk, ADMIN_KEY, now)


def test_admin_page_for_scripts_people_and_disabled_admin(app_client, tmp_path):
    c = app_client
    page = c.get("/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert page.status_code == 200 and 'id="versions-table"' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    login = c.get("/admin")
    assert login.status_code == 200 and 'id="login-form"' in login.text and "versions-table" not in login.text
    wrong = c.get("/admin", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Wrong admin key" in wrong.text
    c.cookies.set(admin.SESSION_COOKIE, admin.session_token(ADMIN_KEY, int(time.time()) - 1), path="/admin")
    expired = c.get("/admin")
    assert expired.status_code == 200 and "session has ended" in expired.text
    assert c.get("/").status_code == 200 and 'id="composer"' in c.get("/").text

    app = app_module.create_app(Settings(home=tmp_path / "noadmin"), engines=[FakeEngine()])
    app.include_router(ui.router)
    with TestClient(app) as c2:
        r = c2.get("/admin")
        assert r.status_code == 403 and "AGENTLOOP_ADMIN_KEY" in r.text and "login-form" not in r.text
        assert c2.post("/admin/login", data={"key": "x"}).status_code == 403


def test_static_routes_serve_only_their_folder(app_client):
    r = app_client.get("/ui/static/chat.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    with pytest.raises(NotFound):
        ui._file(ui.STATIC_DIR, "../ui.py", "no")
    with pytest.raises(NotFound):
        ui._file(ui.STATIC_DIR, "/etc/passwd", "no")


def test_missing_chart_library_is_said_on_the_page(app_client, tmp_path, monkeypatch):
    monkeypatch.setattr(ui, "VENDOR_DIR", tmp_path / "empty")
    page = app_client.get("/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'id="charts-missing"' in page and ".ci/ui-assets" in page and "/ui/vendor/" not in page
    r = app_client.get(f"/ui/vendor/{ui.CHART_JS}")
    assert r.status_code == 404 and ".ci/ui-assets" in r.json()["error"]["message"]


def test_ui_imports_neither_torch_nor_vllm():
    code = ("import sys, agentloop.serve.http.ui, agentloop.serve.store.stats; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_stats_count_feedback_by_kind_and_version(app_client):
    c, user = app_client, {"Authorization": f"Bearer {USER_KEY}"}
    ids = []
    for _ in range(3):
        r = c.post("/v1/chat/completions", headers=user,
                   json={"model": "agentloop", "messages": [{"role": "user", "content": "hi"}]})
        ids.append(r.json()["id"])
    for cid, value in zip(ids, (1, 1, -1)):
        assert c.post("/v1/feedback", headers=user, json={"type": "thumbs", "completion_id": cid,
                                                          "value": value}).status_code == 200
    assert c.post("/v1/feedback", headers=user, json={"type": "pairwise", "chosen_id": ids[0],
                                                      "rejected_id": ids[1]}).status_code == 200
    assert c.get("/admin/stats").status_code == 401
    s = c.get("/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert {(r["version"], r["type"], r["count"]) for r in s["feedback"]} == {("v0000", "thumbs", 3),
                                                                              ("v0000", "pairwise", 1)}
    assert s["thumbs"] == [{"version": "v0000", "up": 2, "down": 1, "rate": pytest.approx(2 / 3)}]
    assert s["traffic"] == [{"version": "v0000", "count": 3, "ok": 3}]
    assert s["alias_traffic"]["versions"] == [{"version": "v0000", "count": 3, "ok": 3, "share": 1.0}]
    assert s["grades"] == []
    admin_h = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for said in ("Hi there", "Bye"):  # what FakeEngine answers, and not
        assert c.post("/admin/grade", headers=admin_h, json={"completion_id": ids[0], "reference": {
            "role": "assistant", "content": said}}).status_code == 200
    s = c.get("/admin/stats", headers=admin_h).json()
    assert s["grades"] == [{"version": "v0000", "grader": "reference_text", "n": 2, "failed": 0,
                            "mean_score": pytest.approx(0.5)}]


# ---------------------------------------------------------------- browser, against the real server

# A second gateway for when serve/http/app.py does not include ui.router yet: same
# engine (attached), same store and adapters, with the UI and the stats mixin
# wired in exactly as the lead will wire them.
_WIRED_GATEWAY = """
import json, sys
import uvicorn
from agentloop.serve.http import app as app_module
from agentloop.serve.http import ui
from agentloop.serve.settings import Settings
cfg = json.loads(sys.argv[1])
app = app_module.create_app(Settings(**cfg["settings"]))
if not any(getattr(r, "path", None) == "/admin/stats" for r in app.routes):
    app.include_router(ui.router)
uvicorn.run(app, host="127.0.0.1", port=cfg["port"], log_level="warning")
"""


def _serves_ui(url: str) -> bool:
    try:
        stats = httpx.get(f"{url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
        return httpx.get(f"{url}/", timeout=10).status_code == 200 and stats.status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def gateway(server):
    """The URL of a gateway serving the UI on the session's engine and store."""
    if _serves_ui(server.url):
        yield server.url
        return
    port = free_port()
    cfg = {"port": port, "settings": {"home": str(server.home), "model": str(server.model_dir),
                                      "engine_urls": [server.engine_url], "admin_key": ADMIN_KEY,
                                      "health_interval": 0.5}}
    log = open(server.home / "ui-gateway.log", "ab")
    proc = subprocess.Popen([sys.executable, "-c", _WIRED_GATEWAY, json.dumps(cfg)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"UI gateway exited; see {server.home / 'ui-gateway.log'}"
            assert time.monotonic() < deadline, "UI gateway not ready after 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        stop_gateway(proc)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium; .ci/setup installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    from playwright.sync_api import expect

    # expect() has its own 5 s default, too short for a loaded CPU engine to stream an answer.
    expect.set_options(timeout=TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / name), full_page=True)


def feedback_row(server, fid: str) -> dict:
    with server.db() as con:
        con.row_factory = sqlite3.Row
        row = con.execute("SELECT * FROM feedback WHERE id = ?", (fid,)).fetchone()
    assert row is not None, f"feedback {fid} is not in the store"
    return dict(row)


def open_chat(pg, gateway: str, *, thinking: bool = False, tools: bool = False) -> None:
    pg.goto(f"{gateway}/")
    pg.fill("#api-key", USER_KEY)
    pg.fill("#temperature", "0")  # greedy: the tiny model's scripted answers
    pg.wait_for_selector("#model option[value='agentloop']", state="attached")
    pg.select_option("#model", "agentloop")
    pg.set_checked("#thinking", thinking)
    pg.set_checked("#tools", tools)


def ask(pg, text: str) -> None:
    pg.fill("#prompt", text)
    pg.click("#send")


def stored_id(status) -> str:
    from playwright.sync_api import expect

    expect(status).to_have_class("fb-status ok")
    fid = status.get_attribute("data-feedback-id")
    assert fid and fid.startswith("fb-") and fid in status.inner_text()  # the page says which row it stored
    return fid


def test_chat_streams_and_every_click_is_feedback(gateway, server, page):
    from playwright.sync_api import expect

    open_chat(page, gateway)
    ask(page, "Hello")
    first = page.locator(".answer").first
    expect(first).to_have_attribute("data-completion-id", re.compile(r"^chatcmpl-"))
    expect(first.locator(".content")).to_have_text(GREETING)
    # It arrived in pieces: streamed. (At least the role and the text: on a loaded machine vLLM merges
    # the tokens it made while the client was behind into one delta, so a short answer may be one.)
    assert int(first.get_attribute("data-chunks")) >= 2
    cid = first.get_attribute("data-completion-id")
    assert server.wait_row(cid)["stream"]  # the log says so too (written off the response path)
    assert "agentloop@v" in first.locator(".meta").inner_text()

    first.locator("button.thumb[data-value='-1']").click()
    row = feedback_row(server, stored_id(first.locator(".fb-status")))
    assert (row["type"], row["value"], row["completion_id"]) == ("thumbs", -1, cid)

    first.locator("button.correct").click()
    first.locator(".correction-text").fill("Hi! What can I do for you?")
    first.locator(".correction button[type=submit]").click()
    row = feedback_row(server, stored_id(first.locator(".fb-status")))
    assert row["type"] == "correction" and row["completion_id"] == cid
    assert json.loads(row["correction"]) == {"role": "assistant", "content": "Hi! What can I do for you?"}

    first.locator("button.regenerate").click()
    answers = page.locator(".turn.pair .answer")
    expect(answers).to_have_count(2)
    second = answers.nth(1)
    expect(second).to_have_attribute("data-completion-id", re.compile(r"^chatcmpl-"))
    expect(second.locator(".content")).to_have_text(GREETING)
    second_id = second.get_attribute("data-completion-id")
    assert second_id != cid
    second.locator("button.prefer").click()
    row = feedback_row(server, stored_id(second.locator(".fb-status")))
    assert (row["type"], row["chosen_id"], row["rejected_id"]) == ("pairwise", second_id, cid)
    expect(second).to_have_class(re.compile(r"\bpreferred\b"))
    assert first.locator(".fb-status").get_attribute("data-feedback-id")  # earlier ids stay on the page
    shot(page, "chat.png")

    page.reload()  # the key stays in this browser (localStorage), not in the page
    expect(page.locator("#api-key")).to_have_value(USER_KEY)


def test_chat_shows_thinking_collapsed_and_tool_calls_with_results(gateway, page):
    from playwright.sync_api import expect

    open_chat(page, gateway, thinking=True)
    ask(page, "What is 2+2?")
    answer = page.locator(".answer").first
    expect(answer.locator(".content")).to_have_text("2 + 2 = 4.")
    thinking = answer.locator("details.thinking")
    expect(thinking).to_be_visible()
    assert thinking.get_attribute("open") is None  # collapsed above the answer
    expect(answer.locator(".reasoning")).to_have_text("The user wants the sum of 2 and 2. That is 4.")
    expect(answer.locator(".reasoning")).to_be_hidden()
    thinking.locator("summary").click()
    expect(answer.locator(".reasoning")).to_be_visible()
    shot(page, "chat-thinking.png")

    page.click("#new-chat")
    page.set_checked("#thinking", False)
    page.set_checked("#tools", True)
    ask(page, "What is the weather in Paris?")
    call = page.locator(".tool-call[data-name='get_weather']")
    expect(call.locator(".tc-result")).to_contain_text('"condition": "sunny"')
    assert json.loads(call.locator(".tc-args").inner_text()) == {"city": "Paris"}
    final = page.locator(".turn.assistant").nth(1).locator(".answer .content")
    expect(final).to_have_text("It is sunny and 18 degrees in Paris.")
    expect(page.locator("#send")).to_have_text("Send")
    shot(page, "chat-tools.png")


def _ensure_run_with_metrics(server) -> None:
    """The charts need a training run with per-step metrics: add one through the store API if none exists."""
    store = Store(f"sqlite:///{server.home / 'agentloop.db'}")
    try:
        if any(store.run_metrics(r["id"]) for r in store.list_runs(limit=50)):
            return
        run = store.create_run(method="dpo", trigger="admin", promote=False, params={"source": "tests/test_ui.py"})
        for step in range(1, 9):
            store.add_run_metrics(run["id"], step, {"loss": 0.693 - 0.05 * step, "rewards/margins": 0.04 * step,
                                                    "rewards/accuracies": min(1.0, 0.4 + 0.08 * step)})
        store.update_run(run["id"], status="rejected", parent="v0000",
                         dataset={"kind": "dpo", "train": 16, "eval": 4, "gate_pairs": 4, "graded_rows": 6,
                                  "graded_candidates": 14},
                         gate={"passed": False, "preference": {"candidate": {"accuracy": 0.5, "n": 4},
                                                               "live": {"accuracy": 0.5, "n": 4}},
                               "tool_validity": {"candidate": {"validity": 1.0}, "live": {"validity": 1.0}}},
                         reason="synthetic run from tests/test_ui.py: accuracy 0.50 does not beat live 0.50")
    finally:
        store.close()


def test_dashboard_login_versions_charts_and_confirmed_actions(gateway, server, page):
    from playwright.sync_api import expect

    _ensure_run_with_metrics(server)
    user = {"Authorization": f"Bearer {USER_KEY}"}
    r = httpx.post(f"{gateway}/v1/chat/completions", headers=user, timeout=120, json={
        "model": "agentloop", "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]})
    httpx.post(f"{gateway}/v1/feedback", headers=user, timeout=30,
               json={"type": "thumbs", "completion_id": r.json()["id"], "value": 1}).raise_for_status()
    # A reference feedback: graded once stored, and the grades table shows it.
    httpx.post(f"{gateway}/v1/feedback", headers=user, timeout=30, json={
        "type": "reference", "completion_id": r.json()["id"],
        "reference": {"role": "assistant", "content": "Hello! How can I help?"}}).raise_for_status()
    deadline = time.monotonic() + 15
    while not httpx.get(f"{gateway}/admin/grades", params={"completion_id": r.json()["id"]}, timeout=10,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]:
        assert time.monotonic() < deadline, "the reference feedback was not graded"
        time.sleep(0.1)
    # Scripts: the page itself answers a Bearer header.
    assert "versions-table" in httpx.get(f"{gateway}/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text

    page.goto(f"{gateway}/admin")
    page.fill("#admin-key", "definitely-not-the-admin-key")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("Wrong admin key: access refused.")
    assert not page.context.cookies()
    shot(page, "admin-login-refused.png")

    page.fill("#admin-key", ADMIN_KEY)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{gateway}/admin")
    (cookie,) = page.context.cookies()
    assert cookie["name"] == admin.SESSION_COOKIE and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.wait_for_selector("body[data-loaded='1']")
    expect(page.locator("#versions-table tr[data-version='v0000']")).to_contain_text("v0000")
    expect(page.locator("#live-version")).not_to_have_text("…")
    assert page.locator("#charts-missing").count() == 0
    for chart in ("chart-loss", "chart-margin", "chart-accuracy", "chart-feedback"):
        assert int(page.get_attribute(f"#{chart}", "data-points")) > 0, chart
        drawn = page.evaluate(f"Chart.getChart(document.getElementById('{chart}'))"
                              ".data.datasets.reduce((n, d) => n + d.data.length, 0)")
        assert drawn > 0, chart
    expect(page.locator("#thumbs-table")).to_contain_text("v0000")
    expect(page.locator("#grades-table")).to_contain_text("reference_text")
    expect(page.locator("#runs-table tbody tr").first).not_to_contain_text("No training runs")
    # A run says how many of its rows came from grades and how many answers were graded for them.
    expect(page.locator("#runs-table tbody tr td.graded").first).to_have_text(
        re.compile(r"^\d+ / \d+( \(\d+ sampled\))?$"))
    shot(page, "dashboard.png")

    # Every action is confirmed first: dismissing changes nothing.
    runs_before = len(httpx.get(f"{gateway}/admin/runs", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"])
    page.once("dialog", lambda d: d.dismiss())
    page.click("#train-form button[type=submit]")
    expect(page.locator("#status")).to_have_text("Cancelled: nothing was changed.")
    runs_after = httpx.get(f"{gateway}/admin/runs", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert len(runs_after) == runs_before
    # Accepting calls the API with the session cookie; its answer (or refusal) is shown.
    page.once("dialog", lambda d: d.accept())
    page.click("#canary-off")
    expect(page.locator("#status")).to_have_text("Canary is off.")
    live = next(m["version"] for m in httpx.get(f"{gateway}/v1/models").json()["data"] if not m.get("parent"))
    page.select_option("#canary-version", live)
    page.once("dialog", lambda d: d.accept())
    page.click("#canary-form button[type=submit]")
    # The live version cannot be its own canary: the API's refusal is shown as it is.
    expect(page.locator("#status")).to_have_text(f"Refused: {live} is already live.")

    # If the charting library cannot be loaded, the page says so and the tables still work.
    page.route("**/ui/vendor/**", lambda route: route.fulfill(status=404, body="missing"))
    page.reload()
    page.wait_for_selector("body[data-loaded='1']")
    expect(page.locator("#charts-missing")).to_contain_text("Charts are unavailable")
    expect(page.locator("#versions-table tr[data-version='v0000']")).to_be_visible()
    expect(page.locator("#chart-loss + .no-data")).to_have_text("Chart unavailable (see above).")
    shot(page, "dashboard-no-charts.png")
    page.unroute("**/ui/vendor/**")

    page.click(".logout button")
    expect(page.locator("#login-form")).to_be_visible()
    assert not page.context.cookies()
