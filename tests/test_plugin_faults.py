"""Plugin faults (issue 9): a plugin raises, hangs and returns garbage in every
hook in turn. Streams through other plugins stay byte-identical, the fault is
counted against the plugin and shown by admin, the server stays ready (or
refuses to start, naming the plugin, when the fault is in start-up), and
shutdown stays within its one grace period. The matrix lives in
bench/plugin_faults.py, which the reliability report runs too."""

from __future__ import annotations

import pytest

from bench.plugin_faults import HOOKS, MODES, baseline, run_case

from .conftest import start_server


@pytest.fixture(scope="module")
def expected():
    return baseline(start_server)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("mode", MODES)
def test_a_plugin_fault_is_contained(hook, mode, expected, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", "x")  # run_case sets its own; restored after
    result = run_case(hook, mode, expected, start_server)
    assert result.held, f"{hook}/{mode}: {result.notes} (start: {result.start})"
