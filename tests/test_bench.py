"""The benchmark harness (bench/) keeps working: a smoke run of `python -m bench`.

A tiny subset runs for about a second per part: the direct and the provider
scenario at concurrency 1, 50 streams for the memory scenario, 20 disconnects,
the micro benchmarks. Only the shape of the JSON and the sanity of its numbers
are checked, never a timing threshold: the benchmark is a tool, not a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_quick_benchmark_writes_sane_json(tmp_path):
    command = [
        sys.executable, "-m", "bench", "--quick",
        "--only", "direct,provider,memory,cancellation,micro",
        "--concurrency", "1", "--duration", "1", "--warmup", "0.3",
        "--streams", "50", "--disconnects", "20",
        "--results-dir", str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, f"python -m bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())

    assert results["failures"] == {}
    assert {"started", "command", "options", "machine", "scenarios", "seconds"} <= set(results)
    assert _positive(results["machine"]["nproc"]) and results["machine"]["python"]

    for name in ("direct", "provider"):
        (run,) = results["scenarios"][name]["runs"]
        assert run["concurrency"] == 1
        assert run["errors"] == 0, run["error_examples"]
        assert _positive(run["rps"]) and _positive(run["completed"])
        for key in ("latency_ms", "ttfc_ms"):
            stats = run[key]
            assert _positive(stats["p50"]) and _positive(stats["p99"]) and stats["p50"] <= stats["p99"]
        assert run["events_per_response"]["min"] == 52  # 50 content chunks, usage, [DONE]
    provider = results["scenarios"]["provider"]["runs"][0]
    assert _positive(provider["ratio_to_direct"])
    assert isinstance(provider["added_p50_ms"], float)
    assert _positive(provider["server_rss_kb"])

    memory = results["memory"]
    assert memory["streams"] == 50 and memory["completed"] == 50, memory
    for key in ("rss_startup_kb", "rss_warm_kb", "rss_open_kb", "rss_after_kb"):
        assert _positive(memory[key]), key
    assert isinstance(memory["kb_per_stream"], float)

    cancel = results["cancellation"]
    assert cancel["disconnects"] == 20, cancel
    assert cancel["delay_ms"]["n"] + cancel["not_closed"] == 20
    assert cancel["delay_ms"]["n"] > 0 and _positive(cancel["delay_ms"]["p50"])

    rows = {row["name"]: row for row in results["micro"]["rows"]}
    for name in ("dispatch, 1 listener", "dispatch, 100 listeners", "relay one chunk, no plugins", "relay one chunk, default stack", "reap 100,000 finished sessions"):
        row = rows[name]
        unit = next(u for u in ("ns", "us", "ms") if u in row)
        assert _positive(row[unit]), row

    assert "provider" in done.stdout and "results:" in done.stdout  # the printed table
