"""`python -m bench.store`: what the store costs, on SQLite and on PostgreSQL.

Owns: the benchmark row of the store issue. The default stack of plugins.toml
is run three ways, alternately in each round (so drift hits all alike), each on a
fresh server process against the shared fast fake upstream:

- `without`: the default stack without the store plugin;
- `sqlite`: with the store on a SQLite file in the run's folder;
- `postgres`: with the store on a fresh database of the PostgreSQL at
  127.0.0.1:5432 (made for the run and dropped after; `--postgres URL` for
  another server).

Per concurrency it prints each side's req/s and server CPU per request (the
median of the rounds), and each store's req/s relative to `without` within the
same round (the median of those ratios). The target of the issue: at most 15 %
less throughput at concurrency 32.

    .venv/bin/python -m bench.store --rounds 3 --duration 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from streamvisor.testing import postgres_database

from . import servers
from .report import RESULTS, Paired
from .scenarios import Bench
from .system import machine, source_state

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def stacks(workdir: Path, postgres_url: str | None) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The three plugin lists: the default stack without the store, and with it
    on each backend (the store keeps its place in plugins.toml's order)."""
    default = servers.default_stack()
    names = [name for name, _ in default]
    if "store" not in names:
        default.insert(names.index("usage") if "usage" in names else len(default), ("store", {}))

    def with_store(url: str | None) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for name, settings in default:
            if name == "store":
                if url is None:
                    continue
                settings = {**settings, "url": url}
            out.append((name, settings))
        return out

    variants = {"without": with_store(None), "sqlite": with_store(f"sqlite:///{workdir}/store.db")}
    if postgres_url is not None:
        variants["postgres"] = with_store(postgres_url)
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,32,256")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help=f"an admin URL of the PostgreSQL to make the run's database in (default {DEFAULT_POSTGRES})")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    options = {"duration": args.duration, "warmup": args.warmup, "concurrency": levels}
    rounds: dict[str, list[dict[int, dict[str, float]]]] = {}

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="streamvisor-bench-store-") as folder, (
        postgres_database(args.postgres, prefix="sv_bench") if not args.no_postgres else nullcontext()
    ) as pg_url:
        workdir = Path(folder)
        bench = Bench(options, workdir, progress)
        variants = stacks(workdir, pg_url)
        try:
            for round_ in range(1, args.rounds + 1):
                for name, plugins in variants.items():
                    server, _ = bench.gateway(f"store-{name}", plugins)
                    upstream = bench.upstream()
                    figures: dict[int, dict[str, float]] = {}
                    try:
                        for level in levels:
                            progress(f"round {round_} of {args.rounds}: {name}, concurrency {level}, {args.duration} s")
                            run = bench.load(server.port, level, watch={"server": server.pid, "upstream": upstream.pid})
                            figures[level] = {"rps": run["rps"], "cpu_ms": run["cpu"]["server"] / run["rps"] * 1000, "p50_ms": run["latency_ms"]["p50"]}
                    finally:
                        bench.stop(server)
                    rounds.setdefault(name, []).append(figures)
        finally:
            bench.stop_all()

    print("\n" + Paired(rounds, levels).tables("store"))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"store-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine(), "source": source_state(servers.ROOT), "options": options, "rounds": rounds}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
