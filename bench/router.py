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

import sys
from pathlib import Path
from typing import Any

from . import paired, servers
from .report import Paired

VARIANTS = ("single", "routed", "hedged")


def config(upstream_port: int, workdir: Path, name: str) -> str:
    plugins: list[tuple[str, dict[str, Any]]] = []
    for plugin, settings in servers.default_stack():
        if plugin == "store":
            settings = {**settings, "url": f"sqlite:///{workdir / (name + '.db')}"}
        if plugin == "retry" and not name.startswith("single"):
            plugins.append(("router", {}))
        plugins.append((plugin, settings))
    text = servers.gateway_config(upstream_port, plugins=plugins)
    if name.startswith("single"):
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
    if name.startswith("hedged"):
        text += "hedge_after_ms = 60000\n"
    text += 'deployments = [{ provider = "bench", model = "bench" }, { provider = "bench2", model = "bench" }]\n'
    return text


def main(argv: list[str] | None = None) -> int:
    args = paired.arguments("python -m bench.router", __doc__).parse_args(argv)

    def variants(workdir: Path) -> dict[str, Any]:
        return {name: (lambda port, round_, name=name: config(port, workdir, f"{name}-{round_}")) for name in VARIANTS}

    rounds = paired.run(args, "router", variants, models={"routed": "smart", "hedged": "smart"})
    print("\n" + Paired(rounds, paired.options(args)["concurrency"], base="single").tables("router"))
    print(f"\nJSON: {paired.save(args, 'router', rounds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
