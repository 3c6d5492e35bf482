"""`python -m bench.compare`: this checkout against another, in paired rounds.

Owns: running the throughput scenarios of two checkouts alternately (round 1 of
this one, round 1 of the other, round 2 of this one, ...), each with its own
Python (its own venv), and printing, per concurrency, the default stack's cost
in each (default stack / provider req/s, paired within each run) and the
provider's req/s, so that a change is judged against the code before it on the
machine in the same state. The machine drifts too much between days for
anything else (docs/performance.md).

    .venv/bin/python -m bench.compare --against ../baseline/.venv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .servers import ROOT


def _run(python: str, cwd: Path, args: list[str], results: Path) -> dict[str, Any]:
    results.mkdir(parents=True, exist_ok=True)
    before = set(results.glob("*.json"))
    command = [python, "-m", "bench", "--results-dir", str(results), *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} (in {cwd}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    (made,) = set(results.glob("*.json")) - before
    return json.loads(made.read_text())


def _figures(result: dict[str, Any]) -> dict[int, dict[str, float]]:
    scenarios = result["scenarios"]
    provider = {r["concurrency"]: r for r in scenarios["provider"]["runs"]}
    out = {}
    for run in scenarios["default_stack"]["runs"]:
        base = provider[run["concurrency"]]
        out[run["concurrency"]] = {"ratio": run["rps"] / base["rps"], "provider_rps": base["rps"], "stack_rps": run["rps"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the Python of the other checkout's venv (its checkout is the folder above the venv)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32,256")
    args = parser.parse_args(argv)
    other_python = Path(args.against).absolute()  # not resolve(): a venv python is a symlink
    other_root = other_python.parent.parent.parent
    bench_args = ["--only", "provider,default_stack", "--duration", str(args.duration), "--concurrency", args.concurrency]
    sides = {"this": (sys.executable, ROOT), "other": (str(other_python), other_root)}
    figures: dict[str, list[dict[int, dict[str, float]]]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="streamvisor-compare-") as folder:
        for round_ in range(1, args.rounds + 1):
            for side, (python, root) in sides.items():
                print(f"round {round_}: {side} ({root})", file=sys.stderr, flush=True)
                figures[side].append(_figures(_run(python, root, bench_args, Path(folder) / side)))
    levels = sorted(figures["this"][0])
    print(f"\nthis: {ROOT}\nother: {other_root}\n{args.rounds} rounds, interleaved; the median of the rounds\n")
    print("| concurrency | default stack / provider, other | this | provider req/s, other | this | rounds (other → this) |")
    print("|---:|---:|---:|---:|---:|---|")
    for level in levels:
        ratio = {side: statistics.median(f[level]["ratio"] for f in figures[side]) for side in sides}
        rps = {side: statistics.median(f[level]["provider_rps"] for f in figures[side]) for side in sides}
        rounds = ", ".join(f"{o[level]['ratio']:.3f}→{t[level]['ratio']:.3f}" for o, t in zip(figures["other"], figures["this"]))
        print(f"| {level} | {ratio['other']:.3f} | {ratio['this']:.3f} | {rps['other']:.0f} | {rps['this']:.0f} | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
