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

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import paired, servers
from .report import Paired
from .scenarios import Bench

PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


def main(argv: list[str] | None = None) -> int:
    args = paired.arguments("python -m bench.responses", __doc__).parse_args(argv)
    options = paired.options(args)
    levels = options["concurrency"]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    progress = paired.progress

    rounds: paired.Rounds = {name: [] for name in PATHS}
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
                            **paired.measured(run),
                            "non200": sum(n for code, n in run["statuses"].items() if code != "200"),
                            "errors": run["errors"],
                            "examples": run["error_examples"],
                            "events": run["events_per_response"],
                        }
                for name in PATHS:
                    rounds[name].append(figures[name])
        finally:
            bench.stop_all()
    table = Paired(rounds, levels, base="chat")
    print("\n" + table.tables("responses"))
    print("\nEvents per stream (min-max): " + "; ".join(
        f"{name} " + ", ".join(f"c{level} {rounds[name][0][level]['events']['min']}-{rounds[name][0][level]['events']['max']}" for level in levels)
        for name in PATHS))
    failed = any(f["non200"] or f["errors"] for runs in rounds.values() for r in runs for f in r.values())
    if failed:
        examples = sorted({e for runs in rounds.values() for r in runs for f in r.values() for e in f["examples"]})[:10]
        print(f"\nWARNING: some requests failed or streams were incomplete: {examples}")
    for level in levels:
        ratio = table.ratio("responses", level)
        print(f"Target (within 10 % of chat) at concurrency {level}: {ratio:.3f}, {'met' if ratio >= 0.9 else 'missed'}")
    print(f"\nJSON: {paired.save(args, 'responses', rounds, started=started)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
