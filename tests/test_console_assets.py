"""The console's assets are files of the package: the vendored libraries are the
ones plugins/console/static/vendor/README.md lists, byte for byte, and no page,
script or style of the console loads anything from another origin at run time."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

CONSOLE = Path(__file__).resolve().parent.parent / "plugins" / "console"
VENDOR = CONSOLE / "static" / "vendor"
VENDOR_README = VENDOR / "README.md"

#: The vendor folder's own files: its provenance, and the script that refreshes it.
VENDOR_TOOLING = {"README.md", "update.sh"}

#: ``  - `uPlot.min.css`, from `dist/uPlot.min.css`, sha256 `df63...` `` in README.md.
_LISTED_FILE = re.compile(r"^\s*- `(?P<name>[^`/]+)`, from `[^`]+`, sha256 `(?P<sha256>[0-9a-f]{64})`\s*$")

# A URL of another origin: http(s)://host or protocol-relative //host.
_REMOTE = r"""(?:https?:)?//[^\s"'`)]"""
#: The ways a page, script or style fetches something: an element that loads its
#: src/href (an <a href> only links), CSS url() and @import, JavaScript imports,
#: workers, fetches, event streams and sockets, and a script's src set by code.
_LOADS_REMOTE = [
    re.compile(rf"""<(?:script|link|img|iframe|source|audio|video|embed|object|track|image|use)\b[^>]*?\b(?:src|href|srcset|data|poster|xlink:href)\s*=\s*["']?\s*{_REMOTE}""", re.I),
    re.compile(rf"""url\(\s*["']?\s*{_REMOTE}""", re.I),
    re.compile(rf"""@import\s+(?:url\(\s*)?["']?\s*{_REMOTE}""", re.I),
    re.compile(rf"""\bimport\s*(?:\(|[\w{{}}*,\s]+\bfrom)\s*["'`]\s*{_REMOTE}"""),
    re.compile(rf"""\bimport\s+["'`]\s*{_REMOTE}"""),
    re.compile(rf"""\b(?:importScripts|fetch|EventSource|WebSocket|Worker|SharedWorker|sendBeacon)\s*\(\s*["'`]\s*(?:wss?:|https?:)?//"""),
    re.compile(rf"""\.(?:src|href)\s*=\s*["'`]\s*{_REMOTE}"""),
]


def _listed_files() -> dict[str, str]:
    listed = {}
    for line in VENDOR_README.read_text(encoding="utf-8").splitlines():
        match = _LISTED_FILE.match(line)
        if match:
            listed[match["name"]] = match["sha256"]
    return listed


def _remote_loads(text: str) -> list[str]:
    return [match.group(0) for pattern in _LOADS_REMOTE for match in pattern.finditer(text)]


def _console_text_files() -> list[Path]:
    """Every file of the console's package that a browser could be handed, or
    that writes HTML: its static files and its Python modules."""
    if not CONSOLE.is_dir():
        return []
    files = []
    for path in sorted(CONSOLE.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path in (VENDOR_README, VENDOR / "update.sh"):
            continue
        if path.suffix in {".png", ".jpg", ".jpeg", ".gif", ".webp", ".ico", ".woff", ".woff2"}:
            continue
        files.append(path)
    return files


def test_vendor_readme_lists_files():
    assert VENDOR_README.is_file(), f"{VENDOR_README} is missing"
    listed = _listed_files()
    assert "uPlot.iife.min.js" in listed and "uPlot.min.css" in listed and "uPlot.LICENSE" in listed, listed


@pytest.mark.parametrize("name", sorted(_listed_files()) if VENDOR_README.is_file() else [])
def test_vendored_file_is_the_one_listed(name):
    path = VENDOR / name
    assert path.is_file(), f"{VENDOR_README} lists {name}, which is not in {VENDOR}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == _listed_files()[name], (
        f"{path} is not the file {VENDOR_README} describes (sha256 {digest}); vendored files are "
        "changed only by their update command (update.sh), which rewrites the README too"
    )


def test_vendor_holds_only_listed_files():
    present = {path.name for path in VENDOR.iterdir() if path.is_file()}
    unlisted = present - set(_listed_files()) - VENDOR_TOOLING
    assert not unlisted, f"{VENDOR} holds files its README.md does not list: {sorted(unlisted)}"


def test_the_pinned_version_is_recorded():
    text = VENDOR_README.read_text(encoding="utf-8")
    version = re.search(r"^- Version: (\d+\.\d+\.\d+)$", text, re.M)
    assert version, "the uPlot section of vendor/README.md names no exact version"
    assert re.search(r"^- Integrity: sha512-[A-Za-z0-9+/]+=*$", text, re.M), "no sha512 integrity in vendor/README.md"
    # The minified build carries its version in its banner.
    assert f"(v{version[1]})" in (VENDOR / "uPlot.iife.min.js").read_text(encoding="utf-8").splitlines()[0]


def test_console_loads_nothing_from_the_internet():
    files = _console_text_files()
    assert files, f"no console files under {CONSOLE}"
    found = {}
    for path in files:
        loads = _remote_loads(path.read_text(encoding="utf-8", errors="replace"))
        if loads:
            found[str(path.relative_to(CONSOLE))] = loads
    assert not found, f"the console loads these from other origins, and must serve them itself: {found}"


@pytest.mark.parametrize(
    "text",
    [
        '<script src="https://cdn.jsdelivr.net/npm/uplot@1.6.32/dist/uPlot.iife.min.js"></script>',
        "<link rel=stylesheet href=//fonts.googleapis.com/css2?family=Inter>",
        '<link rel="preconnect" href="https://fonts.gstatic.com">',
        '<img alt="" src="http://example.com/logo.png">',
        "@font-face { src: url(https://fonts.gstatic.com/s/inter.woff2) }",
        "@import 'https://unpkg.com/uplot/dist/uPlot.min.css';",
        'import uPlot from "https://esm.sh/uplot";',
        "const { marked } = await import('https://esm.sh/marked');",
        "fetch(`https://api.example.com/usage`)",
        "new EventSource('//example.com/live')",
        "new WebSocket('wss://example.com/live')",
        "script.src = 'https://cdn.example.com/x.js'",
    ],
)
def test_remote_loads_are_recognised(text):
    assert _remote_loads(text), f"the check misses {text!r}"


@pytest.mark.parametrize(
    "text",
    [
        '<script type="module" src="/console/static/live.js?v=1"></script>',
        '<link rel="stylesheet" href="/console/static/vendor/uPlot.min.css">',
        '<a href="https://github.com/leeoniya/uPlot">uPlot</a>',
        'document.createElementNS("http://www.w3.org/2000/svg", "svg")',
        "/*! https://github.com/leeoniya/uPlot (v1.6.32) */",
        'const curl = `curl ${location.origin}/v1/chat/completions`;',
        "new EventSource('/console/api/live')",
        'import { h } from "./dom.js";',
    ],
)
def test_local_loads_and_mere_urls_pass(text):
    assert not _remote_loads(text), f"the check flags {text!r}, which loads nothing from elsewhere"
