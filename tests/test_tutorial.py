"""docs/writing-plugins.md, run as written: each step's files (the blocks that
start with a `# file: PATH` line, the latest version of each file as of that
step) are written to a folder, and that step's tests must pass there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "writing-plugins.md"
_STEP = re.compile(r"^## Step (\d+):")
_FENCE = re.compile(r"^```(\w*)\s*$")
_FILE = re.compile(r"^# file: (\S+)\s*$")


def steps() -> list[dict[str, str]]:
    """Per step, every file as it stands at the end of that step."""
    files: dict[str, str] = {}
    out: list[dict[str, str]] = []
    current = None
    block: list[str] | None = None
    for line in TUTORIAL.read_text(encoding="utf-8").splitlines():
        if block is not None:
            if line.startswith("```"):
                match = _FILE.match(block[0]) if block else None
                if match and current is not None:
                    files[match[1]] = "\n".join(block[1:]) + "\n"
                block = None
            else:
                block.append(line)
            continue
        if _FENCE.match(line):
            block = []
            continue
        step = _STEP.match(line)
        if step:
            if current is not None:
                out.append(dict(files))
            current = int(step[1])
    if current is not None:
        out.append(dict(files))
    return out


STEPS = steps()


def test_the_tutorial_has_steps_with_files_and_tests():
    assert len(STEPS) >= 4
    for number, files in enumerate(STEPS, start=1):
        assert "tests/test_pii.py" in files, f"step {number} has no test"


@pytest.mark.parametrize("number", range(1, len(STEPS) + 1))
def test_each_step_passes_as_written(number, tmp_path):
    files = STEPS[number - 1]
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    expected = len(re.findall(r"^def test_", files["tests/test_pii.py"], re.M))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "tests")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{expected} passed" in result.stdout, result.stdout
