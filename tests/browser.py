"""Browser tests: Debian's Chromium driven by Playwright's sync API, and a
screenshot of every page a test opened, saved under tests/artifacts/.

Playwright cannot download its own browsers here, so it drives the system's
/usr/bin/chromium (`apt-get install chromium`; .ci/run installs it). A test
module imports the fixtures it uses::

    from .browser import browser, page  # noqa: F401  (pytest fixtures)

    def test_health(page, scripted_server):
        page.goto(scripted_server.url + "/health")
        assert "ok" in page.inner_text("body")

Browser tests are plain `def` functions, not `async def`. Playwright's sync API
runs an asyncio loop of its own in the test thread, and pytest-trio would run an
async test inside trio's loop, where every Playwright call would block it. The
streamvisor server under test runs in a thread of its own (`start_server`), so a
blocking test does not hold it up. While a browser is open, asyncio counts its
loop as running in this thread, so `asyncio.run()` fails there: the `browser`
fixture is module-scoped, and Playwright stops when the module's tests end.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NoReturn

import pytest

from .conftest import CI

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

__all__ = [
    "ARTIFACTS",
    "CHROMIUM",
    "LAPTOP",
    "PHONE",
    "PHONE_CONTEXT",
    "artifact_path",
    "browser",
    "new_phone_context",
    "open_page",
    "page",
    "phone_page",
]

#: Debian's Chromium; another path or command name in STREAMVISOR_TEST_CHROMIUM.
CHROMIUM = os.environ.get("STREAMVISOR_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

#: The console's two target screens: a laptop, and a phone held upright.
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: A phone's context: its size, touch, and the mobile viewport rules (a page
#: without `<meta name="viewport">` is laid out 980 px wide and shrunk to fit).
PHONE_CONTEXT: dict[str, Any] = {"viewport": PHONE, "is_mobile": True, "has_touch": True}

#: Running as root in a container: Chromium's sandbox needs user namespaces that
#: containers seldom grant, and a container's /dev/shm is often 64 MiB.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]

#: Playwright waits 30 s for an element by default; a console page that has not
#: shown something in 10 s is broken, and the test should say so sooner.
DEFAULT_TIMEOUT_MS = 10_000


def _unavailable(reason: str) -> NoReturn:
    if CI:
        pytest.fail(f"{reason}, and CI must run the browser tests (.ci/run installs Chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    """Headless Chromium for this module's tests; skipped when Chromium or
    Playwright is missing, and failing instead under `CI=true`."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install -e '.[test]')")
    executable = shutil.which(CHROMIUM)
    if executable is None:
        _unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, chromium_sandbox=False, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


def artifact_path(name: str) -> Path:
    """tests/artifacts/<name>.png, with anything but letters, digits, `.`, `_`
    and `-` in `name` (a test's parameters, say) turned into `_`."""
    return ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + ".png")


@contextmanager
def open_page(browser: "Browser", name: str, *, viewport: dict[str, int] = LAPTOP, **context_options: Any) -> Iterator["Page"]:
    """A page in a fresh context (its own cookies and storage), closed when the
    block ends, after a full-page screenshot to `artifact_path(name)`.

    The screenshot is taken when the block raises too: it shows the page as the
    failure left it. Failing to take it raises only when the block did not.
    `context_options` go to `browser.new_context` (`base_url=server.url` lets
    the page `goto("/console")`; `**PHONE_CONTEXT` makes it a phone).
    """
    context = browser.new_context(viewport=viewport, **context_options)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    page = context.new_page()
    failed = False
    try:
        yield page
    except BaseException:
        failed = True
        raise
    finally:
        try:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artifact_path(name)), full_page=True)
        except Exception:
            if not failed:
                raise
        finally:
            context.close()


def new_phone_context(browser: "Browser", **context_options: Any) -> "BrowserContext":
    """A context of a phone held upright (`PHONE_CONTEXT`), for a test that
    opens pages of its own in it; the caller closes it."""
    context = browser.new_context(**{**PHONE_CONTEXT, **context_options})
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    return context


@pytest.fixture
def page(browser: "Browser", request: pytest.FixtureRequest) -> Iterator["Page"]:
    """A 1280x800 page in a fresh context; its screenshot is saved as
    tests/artifacts/<test name>.png when the test ends, passed or failed."""
    with open_page(browser, request.node.name) as opened:
        yield opened


@pytest.fixture
def phone_page(browser: "Browser", request: pytest.FixtureRequest) -> Iterator["Page"]:
    """`page` on a phone (see `new_phone_context`); its screenshot is
    tests/artifacts/<test name>-phone.png."""
    with open_page(browser, request.node.name + "-phone", **PHONE_CONTEXT) as opened:
        yield opened
