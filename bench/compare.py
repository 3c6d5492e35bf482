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
        # Server CPU per request: less sensitive than req/s to what else the
        # two shared cores are doing at the moment.
        cpu_stack = run["cpu"]["server"] / run["rps"] * 1000
        cpu_provider = base["cpu"]["server"] / base["rps"] * 1000
        out[run["concurrency"]] = {
            "ratio": run["rps"] / base["rps"],
            "provider_rps": base["rps"],
            "stack_rps": run["rps"],
            "provider_cpu_ms": cpu_provider,
            "stack_cpu_ms": cpu_stack,
            "cpu_ratio": cpu_stack / cpu_provider,
        }
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
    def median(side: str, level: int, key: str) -> float:
        return statistics.median(f[level][key] for f in figures[side])

    print("Default stack / provider, req/s (higher is better; 1.0 means the stack costs nothing):\n")
    print("| concurrency | other | this | provider req/s, other | this | rounds (other → this) |")
    print("|---:|---:|---:|---:|---:|---|")
    for level in levels:
        rounds = ", ".join(f"{o[level]['ratio']:.3f}→{t[level]['ratio']:.3f}" for o, t in zip(figures["other"], figures["this"]))
        print(
            f"| {level} | {median('other', level, 'ratio'):.3f} | {median('this', level, 'ratio'):.3f} "
            f"| {median('other', level, 'provider_rps'):.0f} | {median('this', level, 'provider_rps'):.0f} | {rounds} |"
        )
    print("\nServer CPU per request, ms (lower is better), and default stack / provider in CPU:\n")
    print("| concurrency | provider, other | this | default stack, other | this | stack / provider CPU, other | this |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        print(
            f"| {level} | {median('other', level, 'provider_cpu_ms'):.2f} | {median('this', level, 'provider_cpu_ms'):.2f} "
            f"| {median('other', level, 'stack_cpu_ms'):.2f} | {median('this', level, 'stack_cpu_ms'):.2f} "
            f"| {median('other', level, 'cpu_ratio'):.3f} | {median('this', level, 'cpu_ratio'):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
