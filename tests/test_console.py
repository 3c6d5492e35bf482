"""The console in a real browser (Debian's Chromium, driven by Playwright):
signing in, live sessions pushed as they happen, stopping one from the page,
its transcript, and an API key that sees only its own sessions. Each test saves
a screenshot under tests/artifacts/. The cookie and CSRF rules are checked with
plain HTTP as well."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from .browser import browser, open_page, page, phone_page  # noqa: F401  (pytest fixtures)
from .conftest import SCRIPTED, ServerThread, make_config

ADMIN_KEY = "console-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    import os

    os.environ["STREAMVISOR_ADMIN_KEY"] = ADMIN_KEY
    folder = tmp_path_factory.mktemp("console")
    text = f"""
[plugins.keys]
[plugins.retry]
backoff_initial = 0.01
[plugins.console]
tick_ms = 100
[plugins.store]
url = "sqlite:///{folder}/s.db"
flush_interval_ms = 50
{SCRIPTED}
[[plugins.scripted.models]]
name = "flaky"
text = "second time lucky"
fail_first = 1
error_status = 502
"""
    thread = ServerThread(make_config(text, session_retention_seconds=30)).start()
    try:
        yield thread
    finally:
        thread.stop()


def create_key(server: ServerThread, identity: str) -> str:
    r = httpx.post(f"{server.url}/admin/keys", json={"identity": identity}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["secret"]


class Stream:
    """A slow chat stream in a thread: its session id as soon as the headers
    come, and its last chunk's finish reason when it ends."""

    def __init__(self, server: ServerThread, key: str, prompt: str = "hi there") -> None:
        self.session_id: str | None = None
        self.started = threading.Event()
        self.finish_reason: str | None = None
        self.done = threading.Event()

        def run() -> None:
            body = {"model": "slow", "messages": [{"role": "user", "content": prompt}], "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60) as response:
                self.session_id = response.headers["x-session-id"]
                self.started.set()
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        for choice in json.loads(line[6:]).get("choices", []):
                            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)


def sign_in(page: Any, server: ServerThread, key: str) -> None:
    page.goto(server.url + "/console")
    assert "/console/login" in page.url
    page.get_by_label("Key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/console/live")


def test_the_admin_sees_a_stream_live_stops_it_and_reads_its_transcript(server, page):
    sign_in(page, server, ADMIN_KEY)
    page.get_by_text("Live: updates are pushed").wait_for()
    stream = Stream(server, ADMIN_KEY, "hi there")
    row = page.locator(f'#live tr[data-id="{stream.session_id}"]')
    t0 = time.monotonic()
    row.wait_for(timeout=1000)  # on the page within a second of its start
    appeared = time.monotonic() - t0
    assert row.locator("td").nth(1).inner_text() == "slow"
    page.wait_for_function(f"() => Number(document.querySelector('#live tr[data-id=\"{stream.session_id}\"] [data-col=tokens]')?.textContent) > 0")
    row.get_by_role("button", name=f"Stop session {stream.session_id}").click()
    assert stream.done.wait(5)
    assert stream.finish_reason == "stopped"
    row.wait_for(state="detached")
    finished = page.locator(f'#history tr[data-id="{stream.session_id}"]')
    finished.wait_for()
    assert finished.locator("td").nth(3).inner_text() == "stopped"
    finished.get_by_role("link").click()
    page.wait_for_url(f"**/console/sessions/{stream.session_id}")
    page.locator("#messages li").first.wait_for()
    assert "hi there" in page.locator("#messages").inner_text()
    page.wait_for_function("() => document.getElementById('output').textContent.includes('tick')")
    assert "stopped" in page.locator("#facts").inner_text()
    assert appeared < 1.0


def test_an_api_key_sees_only_its_own_sessions(server, browser):
    alice, bob = create_key(server, "alice"), create_key(server, "bob")
    mine, theirs = Stream(server, alice, "alice asks"), Stream(server, bob, "bob asks")
    try:
        with open_page(browser, "test_an_api_key_sees_only_its_own_sessions") as page:
            sign_in(page, server, alice)
            page.locator(f'#live tr[data-id="{mine.session_id}"]').wait_for()
            time.sleep(0.5)  # several ticks: bob's would be there by now
            assert page.locator(f'#live tr[data-id="{theirs.session_id}"]').count() == 0
            assert page.locator(".who").inner_text() == "alice"
            # Bob's session by its URL: not found, like an id that never existed.
            page.goto(f"{server.url}/console/sessions/{theirs.session_id}")
            page.wait_for_function("() => document.getElementById('summary').textContent.includes('No session')")
            page.goto(f"{server.url}/console/sessions/{mine.session_id}")
            page.wait_for_function("() => document.getElementById('messages').textContent.includes('alice asks')")
    finally:
        for key, stream in ((alice, mine), (bob, theirs)):
            httpx.post(f"{server.url}/v1/sessions/{stream.session_id}/stop", headers={"Authorization": f"Bearer {key}"})


def test_the_live_page_fits_a_phone(server, phone_page):
    sign_in(phone_page, server, ADMIN_KEY)
    phone_page.get_by_text("Live: updates are pushed").wait_for()
    width = phone_page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width  # the tables scroll inside their frame, not the page


def test_sign_in_cookies_and_csrf_over_plain_http(server):
    with httpx.Client(base_url=server.url, follow_redirects=False) as http:
        assert http.get("/console/live").headers["location"].startswith("/console/login")
        assert http.get("/console/api/feed").status_code == 401
        wrong = http.post("/console/login", data={"key": "sk-sv-nope"})
        assert wrong.status_code == 401 and "incorrect api key" in wrong.text.lower()
        # An open redirect is refused: `next` stays inside the console.
        signed = http.post("/console/login", data={"key": ADMIN_KEY, "next": "//evil.example/steal"})
        assert signed.status_code == 303 and signed.headers["location"] == "/console/live"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie and "Secure" in cookie
        value = re.search(r"sv_console=([^;]+)", cookie).group(1)
        assert ADMIN_KEY not in value
        jar = {"Cookie": f"sv_console={value}"}
        live = http.get("/console/live", headers=jar)
        assert live.status_code == 200 and "default-src 'self'" in live.headers["content-security-policy"]
        token = re.search(r'name="csrf-token" content="([^"]+)"', live.text).group(1)
        stream = Stream(server, ADMIN_KEY)
        url = f"/console/api/sessions/{stream.session_id}/stop"
        assert http.post(url, headers=jar).status_code == 403  # no token
        assert http.post(url, headers={**jar, "X-CSRF-Token": token + "x"}).status_code == 403
        assert http.post(url, headers={**jar, "X-CSRF-Token": token, "Origin": "https://evil.example"}).status_code == 403
        assert not stream.done.wait(0.3)
        assert http.post(url, headers={**jar, "X-CSRF-Token": token}).json()["stopped"] is True
        assert stream.done.wait(5) and stream.finish_reason == "stopped"
        # A forged or tampered cookie is no sign-in.
        assert http.get("/console/api/history", headers={"Cookie": f"sv_console={value[:-2]}AA"}).status_code == 401
        # Nothing of the console's is loaded from elsewhere.
        for name in ("live.js", "session.js", "common.js", "console.css"):
            text = http.get(f"/console/static/{name}").text
            assert "http://" not in text and "https://" not in text, name


def test_the_playground_streams_an_answer_and_stops_it(server, page):
    sign_in(page, server, ADMIN_KEY)
    page.get_by_role("link", name="Playground").click()
    page.wait_for_url("**/console/playground")
    page.get_by_label("Model").select_option("fox")
    page.get_by_label("User message").fill("tell me")
    page.get_by_label("Temperature").fill("0.2")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.getElementById('answer').textContent === 'The quick brown fox jumps over the lazy dog.'")
    page.get_by_text("Done: completed").wait_for()
    facts = page.locator("#play-facts").inner_text()
    assert "Completion tokens" in facts and "Time to first token" in facts
    curl = page.locator("#snippet").inner_text()
    assert curl.startswith("curl -N ") and '"temperature":0.2' in curl and '"content":"tell me"' in curl
    page.get_by_role("button", name="Python").click()
    assert "client.chat.completions.create(" in page.locator("#snippet").inner_text()
    # A long answer, stopped from the page: it ends, stopped.
    page.get_by_label("Model").select_option("slow")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.getElementById('answer').textContent.includes('ticktick')")
    page.get_by_role("button", name="Stop").click()
    page.get_by_text("Done: stopped").wait_for()
    said = page.locator("#answer").inner_text()
    time.sleep(0.3)
    assert page.locator("#answer").inner_text() == said  # nothing more after the stop


def test_models_and_plugins_show_what_serves_and_its_health(server, page):
    sign_in(page, server, ADMIN_KEY)
    page.get_by_role("link", name="Models and plugins").click()
    page.locator("#plugins tbody tr").first.wait_for()
    providers = page.locator("#providers").inner_text()
    assert "scripted" in providers and "fox" in providers and "slow" in providers
    plugins = page.locator("#plugins").inner_text()
    for name in ("console", "keys", "store", "scripted"):
        assert name in plugins
    assert "ready" in page.locator("#health").inner_text()


def test_usage_shows_a_keys_requests_by_key_with_a_csv(server, page):
    r = httpx.post(f"{server.url}/admin/keys", json={"identity": "carol"}, headers=ADMIN)
    key_id, secret = r.json()["id"], r.json()["secret"]
    for _ in range(2):
        server.openai(api_key=secret).chat.completions.create(model="fox", messages=[{"role": "user", "content": "count me"}])
    sign_in(page, server, ADMIN_KEY)
    page.get_by_role("link", name="Usage").click()
    page.wait_for_url("**/console/usage")
    page.get_by_label("By").select_option("key_id")
    row = page.locator("#usage-table tbody tr", has_text=key_id)
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == key_id and cells[1] == "2" and int(cells[3]) > 0
    assert page.locator("#chart-tokens canvas").count() == 1
    for window in ("24 hours", "30 days"):
        page.get_by_label(window).check()
        page.locator("#usage-table tbody tr", has_text=key_id).wait_for()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    text = open(download.value.path()).read()
    assert text.splitlines()[0] == "bucket_start_utc,key_id,sessions,prompt_tokens,completion_tokens,reasoning_tokens,cost_usd"
    assert sum(int(line.split(",")[2]) for line in text.splitlines()[1:] if line.split(",")[1] == key_id) == 2


def test_a_key_created_in_the_console_works_shows_its_spend_and_can_be_revoked(server, page):
    import openai

    sign_in(page, server, ADMIN_KEY)
    page.get_by_role("link", name="Keys").click()
    page.wait_for_url("**/console/keys")
    page.get_by_label("Identity").fill("dora")
    page.get_by_label("Name").fill("dora's laptop")
    page.get_by_label("Budget (US dollars)").first.fill("5")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#secret")
    secret.wait_for()
    value = secret.inner_text()
    assert value.startswith("sk-sv-")
    answer = server.openai(api_key=value).chat.completions.create(model="fox", messages=[{"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content.startswith("The quick brown fox")
    row = page.locator("#keys tbody tr", has_text="dora")
    key_id = row.get_attribute("data-key")
    assert "of $5" in row.inner_text()
    # Its request, in Usage by key.
    page.get_by_role("link", name="Usage").click()
    page.get_by_label("By").select_option("key_id")
    page.locator("#usage-table tbody tr", has_text=key_id).wait_for()
    # Limits, then revoked: the client is refused.
    page.get_by_role("link", name="Keys").click()
    page.get_by_role("button", name=f"Limits of {key_id}").click()
    page.locator("#l-rpm").fill("30")
    page.get_by_role("button", name="Save").click()
    page.locator(f'#keys tr[data-key="{key_id}"]', has_text="30 req/min").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Revoke {key_id}").click()
    page.locator(f'#keys tr[data-key="{key_id}"]', has_text="revoked").wait_for()
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key=value).chat.completions.create(model="fox", messages=[{"role": "user", "content": "again"}])


def test_a_thousand_live_sessions_do_not_freeze_the_live_page(browser, tmp_path):
    """A thousand background sessions, each writing a chunk a second: the Live
    page shows them all, and the page's main thread keeps drawing frames while
    the updates come (the longest gap between two frames stays short)."""
    text = f"""
[plugins.console]
tick_ms = 250
[plugins.scripted]
[[plugins.scripted.models]]
name = "crawl"
text = "step "
repeat = 300
delay = 1.0
"""
    big = ServerThread(make_config(text, max_background_sessions=2000, max_live_sessions=5000)).start()
    try:
        with httpx.Client(base_url=big.url, timeout=30) as http:
            body = {"model": "crawl", "messages": [{"role": "user", "content": "go"}], "background": True}
            for _ in range(1000):
                assert http.post("/v1/chat/completions", json=body).status_code == 202
        with open_page(browser, "test_a_thousand_live_sessions_do_not_freeze_the_live_page") as page:
            sign_in(page, big, ADMIN_KEY)
            page.wait_for_function("() => document.getElementById('live-count').textContent === '1000'", timeout=15_000)
            assert page.locator("#live tbody tr").count() == 1000
            longest = page.evaluate(
                """() => new Promise((done) => {
                    let last = performance.now(), worst = 0;
                    const end = last + 3000;
                    function frame(now) {
                        worst = Math.max(worst, now - last); last = now;
                        if (now < end) requestAnimationFrame(frame); else done(worst);
                    }
                    requestAnimationFrame(frame);
                })"""
            )
            tokens = page.locator("#live tbody tr").first.locator("[data-col=tokens]").inner_text()
        assert longest < 500, f"the page froze for {longest:.0f} ms"
        assert int(tokens) > 0
    finally:
        big.stop()


def test_a_sessions_page_shows_its_retries(server, page):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "flaky", "messages": [{"role": "user", "content": "try"}]}, headers=ADMIN)
    assert response.status_code == 200, response.text
    sign_in(page, server, ADMIN_KEY)
    page.goto(f"{server.url}/console/sessions/{response.headers['x-session-id']}")
    page.wait_for_function("() => document.getElementById('facts').textContent.includes('Retries')")
    facts = page.locator("#facts").inner_text()
    assert "server_error (502)" in facts, facts
    assert "Fallbacks\nnone" in facts
    assert page.locator("#output").inner_text() == "second time lucky"


def test_every_control_of_every_page_has_a_name(server, page):
    """Basic accessibility: each input, select and textarea has a label, each
    button and link a name, and the page has one h1; on every console page."""
    sign_in(page, server, ADMIN_KEY)
    for path in ("/console/live", "/console/usage", "/console/keys", "/console/playground", "/console/models"):
        page.goto(server.url + path)
        page.wait_for_load_state("networkidle")
        unnamed = page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button, a[href]')]
                .filter((e) => e.offsetParent !== null || e.closest('dialog'))
                .filter((e) => {
                    const byLabel = e.labels && e.labels.length > 0;
                    const text = (e.getAttribute('aria-label') || e.textContent || '').trim();
                    return !(byLabel || text);
                }).map((e) => e.outerHTML.slice(0, 80))"""
        )
        assert unnamed == [], (path, unnamed)
        assert page.locator("h1").count() == 1, path


def test_the_console_works_from_the_keyboard(server, page):
    page.goto(server.url + "/console")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'key'")  # autofocus
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    page.wait_for_url("**/console/live")
    for _ in range(10):  # Tab to the Usage link, and follow it
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent") == "Usage":
            break
    assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") != "none"  # focus shows
    page.keyboard.press("Enter")
    page.wait_for_url("**/console/usage")


def test_the_sign_in_page_says_when_the_server_has_no_key_to_sign_in_with(monkeypatch):
    monkeypatch.delenv("STREAMVISOR_ADMIN_KEY")
    bare = ServerThread(make_config("[plugins.console]\n" + SCRIPTED)).start()
    try:
        page = httpx.get(f"{bare.url}/console/login")
        refused = httpx.post(f"{bare.url}/console/login", data={"key": "anything"})
    finally:
        bare.stop()
    assert "STREAMVISOR_ADMIN_KEY" in page.text and "no key to sign in with" in page.text
    assert refused.status_code == 401 and "no key to sign in with" in refused.text
