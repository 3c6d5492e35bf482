"""Take the README's screenshots of the console: `.venv/bin/python docs/images/shoot.py`.

A server with the scripted models, a few live streams and some finished ones,
Debian's Chromium through Playwright (as the browser tests drive it), at a
1280-pixel laptop width. Writes console-live.png and console-playground.png
next to this file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from streamvisor.testing import ServerThread, make_config  # noqa: E402

KEY = "screenshot-admin-key"
MODELS = """
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog. It does so again, and then it rests in the sun."
delay = 0.03

[[plugins.scripted.models]]
name = "story"
text = "Once upon a time a stream flowed through a gateway, and every token of it was counted. "
repeat = 400
delay = 0.25
"""


def main() -> None:
    os.environ["STREAMVISOR_ADMIN_KEY"] = KEY
    folder = tempfile.mkdtemp()
    text = f'[plugins.console]\n[plugins.pricing]\n[plugins.pricing.prices.fox]\ninput = 1.0\noutput = 2.0\n[plugins.store]\nurl = "sqlite:///{folder}/s.db"\n[plugins.scripted]\n{MODELS}'
    server = ServerThread(make_config(text, log_level="warning")).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for i in range(6):
                http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": f"question {i}"}]})
            for i in range(5):
                http.post("/v1/chat/completions", json={"model": "story", "messages": [{"role": "user", "content": f"tell story {i}"}], "background": True})
                time.sleep(0.4)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(server.url + "/console")
            page.get_by_label("Key").fill(KEY)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/console/live")
            page.wait_for_function("() => document.getElementById('live-count').textContent === '5'")
            time.sleep(1.5)
            page.screenshot(path=str(HERE / "console-live.png"))
            page.get_by_role("link", name="Playground").click()
            page.get_by_label("Model").select_option("fox")
            page.get_by_label("System message").fill("You answer in one short paragraph.")
            page.get_by_label("User message").fill("What does a quick brown fox do?")
            page.get_by_role("button", name="Send").click()
            page.get_by_text("Done: completed").wait_for()
            page.screenshot(path=str(HERE / "console-playground.png"), full_page=False)
            browser.close()
    finally:
        server.stop()
    print("wrote", HERE / "console-live.png", "and", HERE / "console-playground.png")


if __name__ == "__main__":
    main()
