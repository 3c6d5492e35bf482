"""`python -m bench.responses`: a Responses API stream against a chat-completions
stream of the same length, paired in one run.

Owns: the benchmark row of the Responses issue. One server (the default stack of
plugins.toml, the `responses` plugin in it, the store on a SQLite file of the
run) in front of the fast fake upstream; in each round, at each concurrency,
the load generator streams `POST /v1/chat/completions` and then `POST
/v1/responses` with the same prompt, so both get the same upstream stream (the
same deltas) and differ only in the API's wire format. Printed: req/s of each,
the paired ratio (responses/chat within each round), server CPU per request, and
every failed or incomplete stream. The issue's target: within 10 %.

    .venv/bin/python -m bench.responses --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import servers
from .report import RESULTS, Paired
from .scenarios import Bench
from .system import machine, source_state

PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.responses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    options = {"duration": args.duration, "warmup": args.warmup, "concurrency": levels, "rounds": args.rounds}
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    rounds: dict[str, list[dict[int, dict[str, Any]]]] = {name: [] for name in PATHS}
    with tempfile.TemporaryDirectory(prefix="streamvisor-bench-responses-") as folder:
        workdir = Path(folder)
        bench = Bench(options, workdir, progress)
        try:
            plugins = servers.default_stack()
            names = [name for name, _ in plugins]
            if "responses" not in names:
                raise SystemExit("the repository's plugins.toml does not enable the responses plugin")
            plugins = [(name, {**settings, "url": f"sqlite:///{workdir / 'store.db'}"} if name == "store" else settings) for name, settings in plugins]
            upstream = bench.upstream()
            server = bench.track(servers.start_streamvisor(workdir, servers.gateway_config(upstream.port, plugins=plugins), name="responses"))
            for round_ in range(1, args.rounds + 1):
                figures: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in PATHS}
                for level in levels:
                    for name, path in PATHS.items():
                        progress(f"round {round_} of {args.rounds}: {name}, concurrency {level}")
                        run = bench.load(server.port, level, watch={"server": server.pid, "upstream": upstream.pid}, path=path)
                        figures[name][level] = {
                            "rps": run["rps"],
                            "cpu_ms": run["cpu"]["server"] / run["rps"] * 1000 if run["rps"] else float("nan"),
                            "p50_ms": run["latency_ms"]["p50"],
                            "non200": sum(n for code, n in run["statuses"].items() if code != "200"),
                            "errors": run["errors"],
                            "examples": run["error_examples"],
                            "events": run["events_per_response"],
                        }
                for name in PATHS:
                    rounds[name].append(figures[name])
        finally:
            bench.stop_all()
    paired = Paired(rounds, levels, base="chat")
    print("\n" + paired.tables("responses"))
    print("\nEvents per stream (min-max): " + "; ".join(
        f"{name} " + ", ".join(f"c{level} {rounds[name][0][level]['events']['min']}-{rounds[name][0][level]['events']['max']}" for level in levels)
        for name in PATHS))
    failed = any(f["non200"] or f["errors"] for runs in rounds.values() for r in runs for f in r.values())
    if failed:
        examples = sorted({e for runs in rounds.values() for r in runs for f in r.values() for e in f["examples"]})[:10]
        print(f"\nWARNING: some requests failed or streams were incomplete: {examples}")
    for level in levels:
        ratio = paired.ratio("responses", level)
        print(f"Target (within 10 % of chat) at concurrency {level}: {ratio:.3f}, {'met' if ratio >= 0.9 else 'missed'}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"responses-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"started": started, "machine": machine(), "source": source_state(servers.ROOT), "options": options,
                               "rounds": {n: [{str(k): v for k, v in r.items()} for r in runs] for n, runs in rounds.items()}}, indent=2))
    print(f"\nJSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
