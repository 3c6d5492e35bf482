"""The frame of a paired benchmark (`bench.otel`, `bench.webhooks`, `bench.router`;
`bench.console` and `bench.responses` use its command line, figures and JSON file).

Owns: their command line (rounds, duration, warm-up, concurrency levels, the
results folder), the rounds in which every variant runs alternately on a
fresh server against the shared fake upstream (so that the machine's drift
hits them alike), the figures kept per concurrency (req/s, server CPU per
request, p50), and the JSON file of a run. What a variant is (its plugins.toml)
and what is checked after its load are the benchmark's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import servers
from .report import RESULTS
from .scenarios import Bench
from .system import machine, source_state

#: rounds[variant][round][concurrency] = {"rps", "cpu_ms", "p50_ms"}
Rounds = dict[str, list[dict[int, dict[str, Any]]]]


def arguments(prog: str, doc: str, rounds: int = 3, duration: float = 5.0) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--duration", type=float, default=duration)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def options(args: argparse.Namespace) -> dict[str, Any]:
    return {"duration": args.duration, "warmup": args.warmup, "concurrency": [int(c) for c in args.concurrency.split(",")], "rounds": args.rounds}


def measured(load: dict[str, Any]) -> dict[str, Any]:
    """What a round keeps of one load run: req/s, server CPU per request (ms), p50 (ms)."""
    return {
        "rps": load["rps"],
        "cpu_ms": load["cpu"]["server"] / load["rps"] * 1000 if load["rps"] else float("nan"),
        "p50_ms": load["latency_ms"]["p50"],
    }


def run(
    args: argparse.Namespace,
    name: str,
    variants: Callable[[Path], dict[str, Callable[[int, int], str]]],
    after: Callable[[str, servers.Proc], None] | None = None,
    models: dict[str, str] | None = None,
) -> Rounds:
    """Every variant once per round, in order, each on a fresh server.
    `variants(workdir)` gives, per variant, the plugins.toml text for an
    upstream port and a round; `after(variant, server)` runs once the loads
    of a variant are done, before its server stops; `models` names the model
    a variant's requests ask for (the fake upstream's "bench" otherwise)."""
    opts = options(args)
    with tempfile.TemporaryDirectory(prefix=f"streamvisor-bench-{name}-") as folder:
        workdir = Path(folder)
        bench = Bench(opts, workdir, progress)
        configs = variants(workdir)
        rounds: Rounds = {variant: [] for variant in configs}
        try:
            for round_ in range(1, args.rounds + 1):
                for variant, config in configs.items():
                    upstream = bench.upstream()
                    server = bench.track(servers.start_streamvisor(workdir, config(upstream.port, round_), name=f"{name}-{variant}"))
                    figures: dict[int, dict[str, Any]] = {}
                    try:
                        for level in opts["concurrency"]:
                            progress(f"round {round_} of {args.rounds}: {variant}, concurrency {level}")
                            load = bench.load(
                                server.port, level, watch={"server": server.pid, "upstream": upstream.pid}, model=(models or {}).get(variant)
                            )
                            figures[level] = measured(load)
                        if after is not None:
                            after(variant, server)
                    finally:
                        bench.stop(server)
                    rounds[variant].append(figures)
        finally:
            bench.stop_all()
    return rounds


def save(args: argparse.Namespace, name: str, rounds: Rounds, **extra: Any) -> Path:
    """The run's JSON file under the results folder: the machine, the source,
    the options, every round's figures and `extra`."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "machine": machine(), "source": source_state(servers.ROOT), "options": options(args),
        "rounds": {n: [{str(k): v for k, v in r.items()} for r in runs] for n, runs in rounds.items()},
        **extra,
    }, indent=2))
    return out
