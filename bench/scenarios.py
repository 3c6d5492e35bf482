"""The scenarios of issue 4 and the order they run in.

Owns: which processes each scenario starts, what load it puts on them, and how
the raw numbers become the result document's sections:

- throughput scenarios (`direct`, `provider`, `default_stack`, `non_stream`,
  and the baselines `hello_quart`, `hello_quart_batched`, `hello_asgi`), each at
  every concurrency;
- `memory`: RSS after start-up and with N streams open at once on a slow upstream;
- `cancellation`: client disconnect to upstream connection close;
- `micro`: in-process costs (bench/micro.py);
- `local_model`: tokens/s through streamvisor versus directly (bench/localmodel.py);
- `profile`: py-spy on streamvisor under the `provider` scenario at concurrency 32.

Every process is started fresh for its scenario (the fake upstream of the
throughput scenarios is shared), stopped afterwards, and talks only to 127.0.0.1.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from . import localmodel, micro, servers
from .report import summary
from .system import open_fds, raise_fd_limit, rss_kb

THROUGHPUT = {
    "direct": "1. direct to the fake upstream (the limit of this harness)",
    "provider": "2. through streamvisor, only the openai provider",
    "default_stack": "3. through streamvisor, the openai provider plus the non-provider plugins of plugins.toml",
    "non_stream": "4. through streamvisor, only the openai provider, non-streaming requests",
    "hello_quart": "baseline: a trivial quart-trio route on hypercorn streaming the same 52 events, one write each",
    "hello_quart_batched": "baseline: the same quart-trio route sending the 52 events in one write",
    "hello_asgi": "baseline: a bare ASGI app on hypercorn (no quart) streaming the same 52 events, one write each",
}
#: Open files the server under test needs besides two per open stream.
FD_RESERVE = 100

OTHER = ["memory", "cancellation", "micro", "local_model", "profile"]
ALL = list(THROUGHPUT) + OTHER


class Bench:
    """One benchmark run: its options, its working folder, its processes."""

    def __init__(self, options: dict[str, Any], workdir: Path, progress: Callable[[str], None]) -> None:
        self.o = options
        self.workdir = workdir
        self.progress = progress
        self.procs: list[servers.Proc] = []
        self._upstream: servers.Proc | None = None

    # -- processes -------------------------------------------------------------------

    def track(self, proc: servers.Proc) -> servers.Proc:
        self.procs.append(proc)
        return proc

    def stop(self, proc: servers.Proc | None) -> None:
        if proc is not None:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        self._upstream = None

    def upstream(self) -> servers.Proc:
        """The fast fake upstream shared by the throughput scenarios."""
        if self._upstream is None or not self._upstream.alive():
            self._upstream = self.track(servers.start_upstream(self.workdir))
        return self._upstream

    def gateway(self, name: str, plugins: list[tuple[str, dict[str, Any]]] = (), upstream: servers.Proc | None = None, **kwargs: Any) -> tuple[servers.Proc, str]:  # type: ignore[assignment]
        upstream = upstream or self.upstream()
        config = servers.gateway_config(upstream.port, plugins=plugins, **kwargs)
        return self.track(servers.start_streamvisor(self.workdir, config, name=name)), config

    # -- throughput ---------------------------------------------------------------------

    def load(
        self, port: int, concurrency: int, *, stream: bool = True, watch: dict[str, int] | None = None, headers: dict[str, str] | None = None,
        path: str | None = None, model: str | None = None,
    ) -> dict[str, Any]:
        o = self.o
        args = [
            "--port", str(port),
            *(["--path", path] if path else []),
            *(["--model", model] if model else []),
            "--concurrency", str(concurrency),
            "--duration", str(o["duration"]),
            "--warmup", str(o["warmup"]),
        ]
        if not stream:
            args.append("--non-stream")
        for name, pid in (watch or {}).items():
            args += ["--watch", f"{name}={pid}"]
        for name, value in (headers or {}).items():
            args += ["--header", f"{name}: {value}"]
        return servers.run_loadgen(self.workdir, "throughput", args, timeout=o["warmup"] + o["duration"] + 120)

    def throughput(self, name: str, round_label: str = "") -> dict[str, Any]:
        """One round of scenario `name`: every concurrency once, on a server
        process of its own (started here, stopped at the end)."""
        upstream = self.upstream()
        plugins: list[tuple[str, dict[str, Any]]] = []
        config = None
        server: servers.Proc | None = None
        if name == "direct":
            port, watch = upstream.port, {"server": upstream.pid}
        elif name.startswith("hello_"):
            server = self.track(servers.start_hello(self.workdir, name.removeprefix("hello_")))
            port, watch = server.port, {"server": server.pid}
        else:
            if name == "default_stack":
                plugins = servers.default_stack()
            server, config = self.gateway(name, plugins)
            port, watch = server.port, {"server": server.pid, "upstream": upstream.pid}
        runs = []
        try:
            for concurrency in self.o["concurrency"]:
                self.progress(f"{name}: concurrency {concurrency}, {self.o['duration']} s{round_label}")
                run = self.load(port, concurrency, stream=name != "non_stream", watch=watch)
                if server is not None:
                    run["server_rss_kb"] = rss_kb(server.pid)
                runs.append(run)
        finally:
            if server is not None:
                self.stop(server)
        result: dict[str, Any] = {"description": THROUGHPUT[name], "runs": runs}
        if name == "default_stack":
            result["plugins"] = [p for p, _ in plugins]
            if not plugins:
                result["note"] = "plugins.toml enables no non-provider plugin yet: this is the same stack as scenario 2"
        if config is not None:
            result["config"] = config
        return result

    def throughput_rounds(self, names: list[str], results: dict[str, Any]) -> None:
        """`repeat` rounds of the throughput scenarios, interleaved (round 1 of
        each scenario, then round 2 of each, ...) and each on a fresh server
        process: drift of the machine over time and the scatter between
        processes of the same code then hit every scenario alike. Per scenario
        and concurrency the run with the median req/s is reported; all rounds'
        req/s are kept in `repeats_rps`."""
        repeat = self.o["repeat"]
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(repeat):
            label = f" (round {i + 1} of {repeat})" if repeat > 1 else ""
            for name in names:
                if name in results["failures"]:
                    continue
                try:
                    rounds[name].append(self.throughput(name, label))
                except Exception as exc:  # one broken scenario must not lose the others
                    self.progress(f"{name} failed: {exc}")
                    results["failures"][name] = f"{type(exc).__name__}: {exc}"
                    self.stop_all()
        for name, done in rounds.items():
            if not done:
                continue
            merged = done[len(done) // 2]  # its description, plugins and config
            runs = []
            for index in range(len(done[0]["runs"])):
                repeats = [result["runs"][index] for result in done]
                run = sorted(repeats, key=lambda r: r["rps"])[len(repeats) // 2]
                if len(repeats) > 1:
                    run["repeats_rps"] = [r["rps"] for r in repeats]
                    run["repeats_p50_ms"] = [r["latency_ms"]["p50"] for r in repeats]
                runs.append(run)
            results["scenarios"][name] = {**merged, "runs": runs}

    # -- memory -------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        requested = n = self.o["streams"]
        interval = 0.1
        # The server holds two sockets per open stream (its client's and its
        # upstream's), plus a few dozen of its own.
        limit = raise_fd_limit(2 * n + FD_RESERVE)
        capped = None
        if 2 * n + FD_RESERVE > limit:
            n = (limit - FD_RESERVE) // 2
            capped = (
                f"{requested} streams need {2 * requested + FD_RESERVE} open files in the server, but RLIMIT_NOFILE "
                f"is {limit} and cannot be raised here: measured {n} streams"
            )
            self.progress(f"memory: {capped}")
            if n < 1:
                return {"skipped": capped}
        result = self._open_streams("streamvisor", n, interval)
        result.update({"streams_requested": requested, "capped": capped, "fd_limit": limit})
        # The floor: the same streams through the least a gateway on this stack
        # does (bench/hello.py, kind relay).
        try:
            floor = self._open_streams("relay", n, interval)
            result["floor"] = {key: floor[key] for key in ("completed", "open_seconds", "rss_startup_kb", "rss_warm_kb", "rss_open_kb", "kb_per_stream")}
        except Exception as exc:  # the floor is context, not the measurement
            self.progress(f"memory: the relay floor failed: {exc}")
            result["floor"] = {"error": f"{type(exc).__name__}: {exc}"}
        return result

    def _open_streams(self, which: str, n: int, interval: float) -> dict[str, Any]:
        """Open `n` streams at once against a slow upstream through `which`
        (`streamvisor`, or the `relay` hello server) and sample its RSS."""
        upstream = self.track(servers.start_upstream(self.workdir, interval=interval, gate_timeout=self.o["streams_timeout"], name=f"upstream-slow-{which}"))
        if which == "relay":
            gateway = self.track(servers.start_hello(self.workdir, "relay", upstream_port=upstream.port))
        else:
            server_settings = {"max_live_sessions": max(20_000, n + 100)}
            gateway, _ = self.gateway("streamvisor-memory", upstream=upstream, max_connections=n + 100, server=server_settings)
        try:
            time.sleep(1.0)
            rss_startup = rss_kb(gateway.pid)
            warm_count = 5 if self.o["quick"] else 20
            self.progress(f"memory ({which}): warm-up ({warm_count} streams)")
            warm = servers.run_loadgen(self.workdir, "streams", ["--port", str(gateway.port), "--count", str(warm_count), "--timeout", "60"], timeout=90, name="loadgen-warm")
            rss_warm = rss_kb(gateway.pid)
            servers.http_json(upstream.port, "POST", f"/bench/gate?n={n}")
            self.progress(f"memory ({which}): {n} streams at once (one chunk every {interval * 1000:.0f} ms)")
            t0 = time.monotonic()
            loadgen, out = servers.start_loadgen(
                self.workdir, "streams", ["--port", str(gateway.port), "--count", str(n), "--timeout", str(self.o["streams_timeout"])], name="loadgen-streams"
            )
            self.track(loadgen)
            # While the upstream holds the streams, and for the ~4.9 s they run
            # after it lets go, all N are open: sample RSS meanwhile.
            held_for = (49 * interval) * 0.8
            samples: list[tuple[float, int]] = []
            opened_at = None
            fds_open = None
            peak = 0
            while loadgen.alive():
                rss = rss_kb(gateway.pid)
                peak = max(peak, rss)
                if opened_at is None:
                    gate = servers.http_json(upstream.port, "GET", "/bench/stats")["gate"]
                    if gate["open"]:
                        opened_at = gate["opened_at"]
                        fds_open = open_fds(gateway.pid)
                if opened_at is not None and time.monotonic() <= opened_at + held_for:
                    samples.append((time.monotonic() - opened_at, rss))
                if time.monotonic() - t0 > self.o["streams_timeout"] + 60:
                    raise RuntimeError("the streams load generator did not finish in time")
                time.sleep(0.2)
            self.stop(loadgen)
            result = json.loads(out.read_text()) if out.exists() else {"completed": 0, "error": loadgen.log_tail()}
            time.sleep(0.5)
            rss_after = rss_kb(gateway.pid)
            if not samples:
                raise RuntimeError(f"the {n} streams were never open at once (the upstream's gate never opened): {result}")
            rss_open = max(rss for _, rss in samples)
            return {
                "streams": n,
                "chunk_interval_s": interval,
                "completed": result.get("completed", 0),
                "errors": result.get("errors"),
                "error_examples": result.get("error_examples", []),
                "open_seconds": round(opened_at - t0, 3),
                # From the moment all were open to the last one's [DONE]; the
                # upstream alone needs 4.9 s (49 more chunks, 100 ms apart).
                "complete_seconds": round(result["last_completed_after_s"] - (opened_at - t0), 3) if result.get("last_completed_after_s") else None,
                "timeout_seconds": self.o["streams_timeout"],
                "rss_startup_kb": rss_startup,
                "rss_warm_kb": rss_warm,
                "rss_open_kb": rss_open,
                "rss_peak_kb": peak,
                "rss_after_kb": rss_after,
                "kb_per_stream": round((rss_open - rss_warm) / n, 2),
                "server_fds_open": fds_open,
                "rss_samples_while_open": [[round(t, 2), r] for t, r in samples],
                "stream_latency_ms": result.get("latency_ms"),
                "warmup_completed": warm.get("completed"),
                "note": "RSS at the end still holds the finished sessions for session_retention_seconds",
            }
        finally:
            self.stop(gateway)
            self.stop(upstream)

    # -- cancellation ----------------------------------------------------------------------

    def cancellation(self) -> dict[str, Any]:
        o = self.o
        interval = o["cancel_interval"]
        upstream = self.track(servers.start_upstream(self.workdir, interval=interval, name="upstream-cancel"))
        gateway, _ = self.gateway("streamvisor-cancel", upstream=upstream)
        try:
            servers.run_loadgen(self.workdir, "streams", ["--port", str(gateway.port), "--count", "8", "--timeout", "60"], timeout=90, name="loadgen-warm")
            servers.http_json(upstream.port, "POST", "/bench/reset")
            self.progress(f"cancellation: {o['disconnects']} disconnects at random points (one event every {interval * 1000:.0f} ms)")
            args = ["--port", str(gateway.port), "--count", str(o["disconnects"]), "--concurrency", str(o["cancel_concurrency"]), "--max-events", "40"]
            cut = servers.run_loadgen(self.workdir, "cancel", args, timeout=60 + o["disconnects"] * 2 * interval * 40 / o["cancel_concurrency"] + 60)
            deadline = time.monotonic() + 5.0
            stats = servers.http_json(upstream.port, "GET", "/bench/stats")
            while stats["streams_cut"] < cut["cut"] and time.monotonic() < deadline:
                time.sleep(0.1)
                stats = servers.http_json(upstream.port, "GET", "/bench/stats")
        finally:
            self.stop(gateway)
            self.stop(upstream)
        closes = {c["tag"]: c for c in stats["closes"]}
        delays = []
        missing = 0
        for c in cut["cuts"]:
            up = closes.get(c["tag"])
            if up is None:
                missing += 1
            else:
                delays.append((up["t_close"] - c["t_close"]) * 1000)
        return {
            "disconnects": len(cut["cuts"]),
            "planned": o["disconnects"],
            "concurrency": o["cancel_concurrency"],
            "chunk_interval_s": interval,
            "delay_ms": summary(delays),
            "not_closed": missing,
            "upstream_completed_streams": stats["streams_completed"],
            "loadgen_errors": cut["errors"],
            "error_examples": cut["error_examples"],
            "events_before_cut": summary([c["events"] for c in cut["cuts"]], digits=1),
        }

    # -- profile ------------------------------------------------------------------------------

    def profile(self) -> dict[str, Any]:
        py_spy = shutil.which("py-spy") or str(Path(servers.PYTHON).parent / "py-spy")
        if not Path(py_spy).exists():
            return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
        seconds = max(1, round(self.o["profile_seconds"]))  # py-spy takes whole seconds
        concurrency = 32
        gateway, _ = self.gateway("streamvisor-profile")
        upstream = self.upstream()
        raw = self.workdir / "profile.txt"
        try:
            self.progress(f"profile: py-spy on streamvisor, scenario provider, concurrency {concurrency}, {seconds} s")
            args = ["--port", str(gateway.port), "--concurrency", str(concurrency), "--duration", str(seconds + 2), "--warmup", "1",
                    "--watch", f"server={gateway.pid}", "--watch", f"upstream={upstream.pid}"]
            loadgen, out = servers.start_loadgen(self.workdir, "throughput", args, name="loadgen-profile")
            self.track(loadgen)
            time.sleep(1.5)
            spy = subprocess.run(
                [py_spy, "record", "--pid", str(gateway.pid), "--duration", str(seconds), "--rate", "250",
                 "--format", "raw", "--nolineno", "--output", str(raw)],
                capture_output=True, text=True, timeout=seconds + 60,
            )
            loadgen.popen.wait(seconds + 120)
            self.stop(loadgen)
            load = json.loads(out.read_text())
        finally:
            self.stop(gateway)
        if spy.returncode != 0 or not raw.exists():
            return {"skipped": f"py-spy failed: {spy.stderr.strip()[-500:]}"}
        saved = self.o["results_dir"] / f"{self.o['started']}-profile.txt"
        saved.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, saved)
        return {
            "scenario": "provider",
            "concurrency": concurrency,
            "seconds": seconds,
            "rps_while_profiled": load["rps"],
            "server_cpu": load["cpu"].get("server"),
            "collapsed_stacks": str(saved),
            **summarize_profile(raw.read_text()),
        }

    # -- the whole run ----------------------------------------------------------------------------

    def run(self, parts: list[str], results: dict[str, Any]) -> None:
        self.throughput_rounds([part for part in parts if part in THROUGHPUT], results)
        for part in parts:
            if part in THROUGHPUT:
                continue
            try:
                if part == "micro":
                    self.progress("micro benchmarks")
                    results["micro"] = micro.run(self.progress)
                elif part == "local_model":
                    results["local_model"] = localmodel.measure(self.workdir, runs=self.o["local_runs"], max_tokens=self.o["local_max_tokens"], progress=self.progress)
                else:
                    results[part] = getattr(self, part)()
            except Exception as exc:  # one broken part must not lose the others
                self.progress(f"{part} failed: {exc}")
                results["failures"][part] = f"{type(exc).__name__}: {exc}"
                self.stop_all()
        self.stop_all()
        add_ratios(results)


def add_ratios(results: dict[str, Any]) -> None:
    """Each throughput run's req/s ratio to `direct`, and the p50 latency it adds;
    for the default stack, its req/s against the provider alone, paired by round
    (the median of round i's stack / round i's provider: both ran minutes apart,
    on the machine in the same state)."""
    scenarios = results["scenarios"]
    provider = {r["concurrency"]: r for r in scenarios.get("provider", {}).get("runs", [])}
    for run in scenarios.get("default_stack", {}).get("runs", []):
        base = provider.get(run["concurrency"])
        if base is None:
            continue
        stack_rounds = run.get("repeats_rps", [run["rps"]])
        provider_rounds = base.get("repeats_rps", [base["rps"]])
        paired = sorted(s / p for s, p in zip(stack_rounds, provider_rounds) if p)
        if paired:
            run["ratio_to_provider"] = round(paired[len(paired) // 2], 3)
            run["ratio_to_provider_rounds"] = [round(r, 3) for r in paired]
    direct = {r["concurrency"]: r for r in results["scenarios"].get("direct", {}).get("runs", [])}
    for name, scenario in results["scenarios"].items():
        for run in scenario["runs"]:
            base = direct.get(run["concurrency"])
            if base is None or name == "direct" or not base["rps"]:
                continue
            run["ratio_to_direct"] = round(run["rps"] / base["rps"], 3)
            if run["latency_ms"]["p50"] is not None and base["latency_ms"]["p50"] is not None:
                run["added_p50_ms"] = round(run["latency_ms"]["p50"] - base["latency_ms"]["p50"], 3)


# -- profile summary ---------------------------------------------------------------------------


def _package(frame: str) -> str:
    """The package a py-spy frame ('function (path)') belongs to."""
    path = frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""
    if path.startswith("/work") or "/main/" in path or path.startswith(("core/", "plugins/", "hooks/", "config/")):
        return "streamvisor"
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if path.startswith("<") or "/" not in path:
        return "stdlib" if path else "?"
    top = path.split("/", 1)[0]
    if top.startswith("python3") or path.startswith("/"):
        return "stdlib"
    return top


def summarize_profile(collapsed: str, top: int = 25) -> dict[str, Any]:
    """Self time per function, inclusive time per function and self time per
    package, from py-spy's raw (collapsed stack) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_counts[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for frame in set(frames):
            incl_counts[frame] += n

    def rows(counter: collections.Counter[str], limit: int) -> list[dict[str, Any]]:
        return [{"frame": f, "samples": c, "percent": round(100 * c / total, 2)} for f, c in counter.most_common(limit)]

    return {
        "samples": total,
        "top_self": rows(self_counts, top),
        "top_inclusive": rows(incl_counts, top * 2),
        "self_by_package": rows(packages, 20),
    }
