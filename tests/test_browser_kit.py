"""tests/browser.py against a real server: Chromium opens streamvisor's routes,
runs the page's JavaScript against them, lays a page out at laptop and phone
widths, and leaves a screenshot of every page under tests/artifacts/, also of a
test that failed."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from .browser import LAPTOP, PHONE, artifact_path, browser, open_page, page, phone_page  # noqa: F401  (fixtures)
from .conftest import SCRIPTED, ServerThread, start_server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: The screenshot the `page` fixture is expected to have saved, by the test that used it.
_page_fixture_screenshots: dict[str, str] = {}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with start_server(SCRIPTED + "\n[plugins.health]\n") as running:
        yield running


def test_page_shows_the_server(page, server, request):
    _page_fixture_screenshots[request.node.name] = str(artifact_path(request.node.name))
    response = page.goto(server.url + "/health")
    assert response is not None and response.status == 200
    assert json.loads(page.inner_text("pre")) == {"status": "ok"}
    assert page.evaluate("() => [innerWidth, innerHeight]") == [LAPTOP["width"], LAPTOP["height"]]
    # The page's own scripts reach the server, same origin.
    paths = page.evaluate("() => fetch('/openapi.json').then(r => r.json()).then(d => Object.keys(d.paths))")
    assert "/health" in paths and "/v1/chat/completions" in paths


def test_phone_page_lays_out_at_phone_width(phone_page):
    # Without <meta name="viewport"> a phone lays the page out 980 px wide and
    # shrinks it to fit: a responsive page needs the tag, and this is how a test
    # would notice it missing.
    phone_page.set_content("<p>no viewport</p>")
    assert phone_page.evaluate("() => innerWidth") == 980
    phone_page.set_content('<meta name="viewport" content="width=device-width, initial-scale=1"><p>narrow</p>')
    assert phone_page.evaluate("() => innerWidth") == PHONE["width"]
    assert phone_page.evaluate("() => matchMedia('(max-width: 480px) and (pointer: coarse)').matches")


def test_a_failing_test_leaves_its_screenshot(browser, server):
    path = artifact_path("test_browser_kit-failed-page")
    path.unlink(missing_ok=True)
    with pytest.raises(AssertionError, match="the page was wrong"):
        with open_page(browser, path.stem, base_url=server.url) as failing:
            failing.goto("/health")
            raise AssertionError("the page was wrong")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_the_page_fixture_saved_its_screenshot():
    if not _page_fixture_screenshots:
        pytest.skip("test_page_shows_the_server did not run in this session")
    for path in _page_fixture_screenshots.values():
        with open(path, "rb") as png:
            assert png.read(8) == PNG_SIGNATURE
