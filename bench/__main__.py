"""`python -m bench`: run the benchmark of issue 4, print a table, write JSON.

Owns: the command line and the run's life cycle (options, the working folder
for logs and generated configs, the result document, exit status). What each
scenario does lives in bench/scenarios.py; how numbers are printed, in
bench/report.py.

    .venv/bin/python -m bench                          # everything (several minutes)
    .venv/bin/python -m bench --quick                  # a smoke run: short and small
    .venv/bin/python -m bench --only provider,memory --concurrency 1,32 --duration 5
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report, scenarios
from .servers import ROOT
from .system import machine, raise_fd_limit, source_state

DEFAULTS = {"duration": 10.0, "warmup": 2.0, "streams": 10_000, "disconnects": 1000, "local_runs": 3, "local_max_tokens": 128, "profile_seconds": 15.0}
QUICK = {"duration": 1.0, "warmup": 0.5, "streams": 200, "disconnects": 100, "local_runs": 1, "local_max_tokens": 16, "profile_seconds": 3.0}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return values


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in scenarios.ALL]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown)}; the scenarios are: {', '.join(scenarios.ALL)}")
    return parts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark streamvisor against a direct call (issue 4): throughput and latency, memory, cancellation, micro costs, the local model.",
        epilog=f"scenarios: {', '.join(scenarios.ALL)}",
    )
    p.add_argument("--quick", action="store_true", help="short durations and small counts, for a smoke run")
    p.add_argument("--only", type=_parts, metavar="SCENARIO[,..]", help="run only these scenarios (default: all)")
    p.add_argument("--duration", type=float, help=f"measured seconds per scenario and concurrency (default {DEFAULTS['duration']:g}, quick {QUICK['duration']:g})")
    p.add_argument("--warmup", type=float, help=f"seconds of load before measuring (default {DEFAULTS['warmup']:g})")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the throughput scenarios, interleaved, each on fresh server processes; per scenario and concurrency the run with the median req/s is reported (default 1)")
    p.add_argument("--concurrency", type=_ints, default=[1, 32, 256], metavar="1,32,256", help="concurrency levels (default 1,32,256)")
    p.add_argument("--streams", type=int, help=f"streams open at once in the memory scenario (default {DEFAULTS['streams']})")
    p.add_argument("--streams-timeout", type=float, help="seconds the memory scenario's streams may take (default: 120 + 50 ms per stream)")
    p.add_argument("--disconnects", type=int, help=f"disconnects in the cancellation scenario (default {DEFAULTS['disconnects']})")
    p.add_argument("--cancel-concurrency", type=int, default=16, help="streams being cut at once (default 16)")
    p.add_argument("--cancel-interval", type=float, default=0.02, help="seconds between upstream events while cutting (default 0.02)")
    p.add_argument("--local-runs", type=int, help="measured runs per side of the local-model comparison (default 3)")
    p.add_argument("--local-max-tokens", type=int, help="max_tokens of the local-model comparison (default 128)")
    p.add_argument("--profile-seconds", type=float, help="seconds py-spy samples streamvisor (default 15)")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS, help="where the JSON goes (default bench/results/)")
    p.add_argument("--keep-logs", action="store_true", help="keep the working folder (process logs, generated configs) and print where")
    return p


def options(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else DEFAULTS
    o: dict[str, Any] = {}
    for key, default in base.items():
        value = getattr(args, key, None)
        o[key] = default if value is None else value
    o["concurrency"] = args.concurrency
    o["repeat"] = max(1, args.repeat)
    o["cancel_concurrency"] = args.cancel_concurrency
    o["cancel_interval"] = args.cancel_interval
    o["streams_timeout"] = args.streams_timeout or 120 + 0.05 * o["streams"]
    o["results_dir"] = args.results_dir
    o["quick"] = args.quick
    return o


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    o = options(args)
    started = report.timestamp()
    o["started"] = started
    parts = args.only or scenarios.ALL
    raise_fd_limit()

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "started": started,
        "command": " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in o.items()},
        "parts": parts,
        "machine": machine(),
        "source": source_state(ROOT),
        "scenarios": {},
        "failures": {},
    }
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="streamvisor-bench-"))
    bench = scenarios.Bench(o, workdir, progress)
    try:
        bench.run(parts, results)
    finally:
        bench.stop_all()
        results["seconds"] = round(time.monotonic() - t0, 1)
        results["source_at_end"] = source_state(ROOT)
        path = report.write_json(results, o["results_dir"], started)
        if args.keep_logs or results["failures"]:
            progress(f"logs and generated configs kept in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render(results))
    for part, message in results["failures"].items():
        print(f"\nFAILED {part}: {message}")
    print(f"\nresults: {path}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
