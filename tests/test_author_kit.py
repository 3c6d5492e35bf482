"""The plugin author's kit, as an author uses it: `streamvisor new-plugin`, then
`pip install -e` of the package it wrote, in a virtual environment of its own
outside the repository, then `pytest` there. The package's tests use
`streamvisor.testing`, found through its pytest entry point."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .test_public_contract import violations

BIN = Path(sys.executable).parent


def _run(*args, cwd, timeout=300, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def kit_venv(tmp_path_factory):
    """A new virtual environment that sees this one's packages (streamvisor
    among them) behind its own, so that installing into it needs no download
    and leaves this environment alone."""
    root = tmp_path_factory.mktemp("kit")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    own = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip()
    outer = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    Path(own, "outer.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    return root, python


def test_new_plugin_writes_a_package_whose_tests_pass_once_installed(kit_venv):
    root, python = kit_venv
    made = _run(str(BIN / "streamvisor"), "new-plugin", "wordcount", "--dir", str(root), cwd=root)
    assert made.returncode == 0, made.stderr
    package = root / "streamvisor-wordcount"
    assert sorted(p.name for p in package.iterdir()) == ["README.md", "pyproject.toml", "streamvisor_wordcount.py", "tests"]
    # The plugin it writes holds to the contract, as the built-ins do.
    assert violations(package / "streamvisor_wordcount.py", {"wordcount"}) == []

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    installed = _run(str(python), "-m", "pip", "install", "--no-build-isolation", "--no-input", "-e", ".[test]", cwd=package, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    tested = _run(str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package, env=env)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "5 passed" in tested.stdout, tested.stdout

    # The plugin's entry point is in the new environment only.
    listed = _run(str(python), "-c", "import importlib.metadata as m; print(sorted(e.name for e in m.entry_points(group='streamvisor')))", cwd=root)
    assert "wordcount" in listed.stdout
    here = _run(sys.executable, "-c", "import importlib.metadata as m; print(sorted(e.name for e in m.entry_points(group='streamvisor')))", cwd=root)
    assert "wordcount" not in here.stdout


def test_new_plugin_refuses_a_bad_name_and_an_existing_folder(tmp_path):
    bad = _run(str(BIN / "streamvisor"), "new-plugin", "Word Count", "--dir", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "must be 1 to 40 lower-case letters" in bad.stderr
    assert _run(str(BIN / "streamvisor"), "new-plugin", "w", "--dir", str(tmp_path), cwd=tmp_path).returncode == 0
    again = _run(str(BIN / "streamvisor"), "new-plugin", "w", "--dir", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr
