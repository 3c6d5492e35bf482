"""`python -m bench.router`: what routing a model through the router costs.

Owns: the benchmark row of the router issue. The default stack of plugins.toml
(the store on a SQLite file of the run) in front of the fast fake upstream,
three ways, alternately in each round on fresh servers:

- `single`: the model `bench` on one upstream, no router;
- `routed`: the router before retry, the model `smart` on two deployments (two
  upstreams of the openai plugin, both the same fake) with the `latency`
  strategy: a choice, a pinned provider, and the learning per request, in the
  session's own task;
- `hedged`: the same with `hedge_after_ms = 60000`, a hedge that never fires:
  every attempt then runs in a task of the router's service and hands its
  deltas over a channel, the price of being ready to hedge.

Per concurrency it prints req/s and server CPU per request (the median of the
rounds) and each against `single` within each round.

    .venv/bin/python -m bench.router --rounds 3 --duration 5
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

VARIANTS = ("single", "routed", "hedged")


def config(upstream_port: int, workdir: Path, name: str) -> str:
    plugins: list[tuple[str, dict[str, Any]]] = []
    for plugin, settings in servers.default_stack():
        if plugin == "store":
            settings = {**settings, "url": f"sqlite:///{workdir / (name + '.db')}"}
        if plugin == "retry" and name != "single":
            plugins.append(("router", {}))
        plugins.append((plugin, settings))
    text = servers.gateway_config(upstream_port, plugins=plugins)
    if name == "single":
        return text
    # A second upstream on the same fake: two deployments of one model.
    text += (
        "\n[[plugins.openai.upstreams]]\n"
        f'name = "bench2"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\nmodels = ["bench"]\n'
        "max_connections = 512\nread_timeout = 600\npool_timeout = 600\n"
    )
    # The router's table sits where the stack put it (before retry); its model
    # table may come anywhere after.
    text += '\n[plugins.router.models.smart]\nstrategy = "latency"\n'
    if name == "hedged":
        text += "hedge_after_ms = 60000\n"
    text += 'deployments = [{ provider = "bench", model = "bench" }, { provider = "bench2", model = "bench" }]\n'
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    options = {"duration": args.duration, "warmup": args.warmup, "concurrency": levels, "rounds": args.rounds}

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    rounds: dict[str, list[dict[int, dict[str, Any]]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="streamvisor-bench-router-") as folder:
        workdir = Path(folder)
        bench = Bench(options, workdir, progress)
        try:
            for round_ in range(1, args.rounds + 1):
                for name in VARIANTS:
                    upstream = bench.upstream()
                    server = bench.track(servers.start_streamvisor(workdir, config(upstream.port, workdir, f"{name}-{round_}"), name=f"router-{name}"))
                    figures: dict[int, dict[str, Any]] = {}
                    try:
                        for level in levels:
                            progress(f"round {round_} of {args.rounds}: {name}, concurrency {level}")
                            run = bench.load(server.port, level, watch={"server": server.pid, "upstream": upstream.pid}, model="bench" if name == "single" else "smart")
                            if not run["rps"] or run.get("errors"):
                                raise SystemExit(f"{name} at concurrency {level}: {run.get('errors')} errors, {run['rps']} req/s")
                            figures[level] = {
                                "rps": run["rps"],
                                "cpu_ms": run["cpu"]["server"] / run["rps"] * 1000,
                                "p50_ms": run["latency_ms"]["p50"],
                            }
                    finally:
                        bench.stop(server)
                    rounds[name].append(figures)
        finally:
            bench.stop_all()
    print("\n" + Paired(rounds, levels, base="single").tables("router"))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"router-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine(), "source": source_state(servers.ROOT), "options": options,
                               "rounds": {n: [{str(k): v for k, v in r.items()} for r in runs] for n, runs in rounds.items()}}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
