"""`python -m bench.reliability`: the reliability and security suite of issue 9,
in one run, with figures; it prints a table and writes docs/reliability.md.

Owns: the order of the parts, their sizes (`--quick` for a smoke run), and the
report. Each part lives in a module of its own and reports plain numbers:

- hostile upstreams (`bench/hostile.py`): each of twelve a hundred times against
  a gateway in a separate process, whose memory is read from /proc;
- the fault mix (`bench/faultmix.py`) and the disconnect storm (`bench/storm.py`);
- plugin faults (`bench/plugin_faults.py`): every hook, raise, hang, garbage;
- terminal events under a slow listener, and the server-wide bound on buffered
  bytes (here);
- the fuzzing and security tests (`tests/test_fuzz.py`, `tests/test_properties.py`,
  `tests/test_security.py`), run by pytest and counted.

Everything talks to 127.0.0.1 only, stops by itself, and is bounded in count
and time (a few minutes in all).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx

from . import hostile
from .servers import ROOT, start_streamvisor
from .system import machine, rss_kb

KEY = "reliability-admin-key"
REPORT = ROOT / "docs" / "reliability.md"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(pct / 100 * len(ordered))) - 1))]


# -- hostile upstreams ------------------------------------------------------------------


def hostile_part(workdir: Path, per_case: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from streamvisor.testing import FakeUpstream

    os.environ["STREAMVISOR_ADMIN_KEY"] = KEY
    cases: dict[str, Any] = {}
    with FakeUpstream() as upstream:
        server_table = '[server]\nhost = "127.0.0.1"\nlog_level = "error"\nsession_retention_seconds = 5\n'
        gateway = start_streamvisor(workdir, server_table + hostile.gateway_toml(upstream.url), name="hostile-gateway")
        base = f"http://127.0.0.1:{gateway.port}"
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        try:
            # The warm-up is a whole round: the first load at this concurrency
            # raises the allocator's high-water mark (about 12 MB here), which
            # later rounds stay at; growth is measured from there.
            rss_start = rss_kb(gateway.pid)
            for name, (_, make) in hostile.CASES.items():
                progress(f"hostile: warm-up, {name}, {per_case} requests")
                upstream.reply(make())
                hostile.run_case(base, per_case)
            time.sleep(6)  # past the gateway's session retention
            rss_warm = rss_kb(gateway.pid)
            for name, (what, make) in hostile.CASES.items():
                progress(f"hostile: {name}, {per_case} requests")
                upstream.reply(make())
                t0 = time.perf_counter()
                outcomes = hostile.run_case(base, per_case)
                elapsed = time.perf_counter() - t0
                deadline = time.monotonic() + 10
                live = None
                while time.monotonic() < deadline:
                    live = admin.get("/admin/sessions/status").json()["counts"]["live"]
                    if live == 0:
                        break
                    time.sleep(0.05)
                upstream.wait_closed(5)
                seconds = [o.seconds for o in outcomes]
                cases[name] = {
                    "what": what,
                    "requests": len(outcomes),
                    "readable_errors": sum(hostile.acceptable(o) for o in outcomes),
                    "kinds": sorted({f"{o.kind} {o.status or ''} {o.code or ''}".strip() for o in outcomes}),
                    "p50_s": round(statistics.median(seconds), 3),
                    "max_s": round(max(seconds), 3),
                    "within_timeouts": sum(s < hostile.deadline(name) for s in seconds),
                    "live_after": live,
                    # Connections that carried a chat request and are still open
                    # (the health probe's idle keep-alive GETs are not those).
                    "upstream_open_after": sum(1 for r in upstream.connection_log if r.requests and r.closed is None),
                    "wall_s": round(elapsed, 1),
                }
            time.sleep(6)
            rss_after = rss_kb(gateway.pid)
        finally:
            admin.close()
            gateway.stop()
    return {
        "per_case": per_case,
        "cases": cases,
        "rss_start_mb": round(rss_start / 1024, 1),
        "rss_warm_mb": round(rss_warm / 1024, 1),
        "rss_after_mb": round(rss_after / 1024, 1),
        "rss_growth_pct": round((rss_after - rss_warm) / rss_warm * 100, 1),
    }


# -- terminal events under a slow listener -------------------------------------------------


def slow_listener_part(sessions: int, concurrency: int, delay: float, progress: Callable[[str], None]) -> dict[str, Any]:
    import trio

    from streamvisor.hooks import hookimpl, listens_to
    from streamvisor.testing import start_server

    class SlowLedger:
        def __init__(self) -> None:
            self.recorded: list[tuple[str, int]] = []

        @hookimpl
        @listens_to("completed", "failed", "stopped", "disconnected")
        async def on_event(self, event: Any) -> None:
            await trio.sleep(delay)
            self.recorded.append((event.session_id, event.usage.completion_tokens))

    ledger = SlowLedger()
    toml = '[plugins.scripted]\n[[plugins.scripted.models]]\nname = "fox"\ntext = "The quick brown fox jumps over the lazy dog."\n[plugins.ledger]\n'
    progress(f"slow listener: {sessions} sessions at concurrency {concurrency}, {delay * 1000:.0f} ms per terminal event")
    with start_server(toml, plugins={"ledger": ledger}, log_level="warning") as server:
        http = server.http(limits=httpx.Limits(max_connections=concurrency))
        body = {"model": "fox", "stream": True, "messages": [{"role": "user", "content": "go"}]}
        backlog: list[int] = []
        rss_before = rss_kb(os.getpid())
        t0 = time.perf_counter()

        def one(_: int) -> bool:
            ok = http.post("/v1/chat/completions", json=body).text.endswith("data: [DONE]\n\n")
            return ok

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(one, i) for i in range(sessions)]
            while not all(f.done() for f in futures):
                backlog.append(server.call(server.runtime.events.terminal_backlog))
                time.sleep(0.05)
            completed = sum(f.result() for f in futures)
        streamed = time.perf_counter() - t0
        rss_peak = rss_kb(os.getpid())
        server.wait_for(lambda: len(ledger.recorded) >= sessions, timeout=sessions * delay * 3 + 30)
        drained = time.perf_counter() - t0
        stats = server.call(lambda: {s.plugin: s for s in server.runtime.events.stats})["ledger"]
    return {
        "sessions": sessions,
        "concurrency": concurrency,
        "listener_ms_per_event": delay * 1000,
        "streams_completed": completed,
        "recorded": len({s for s, _ in ledger.recorded}),
        "dropped": stats.dropped,
        "streams_done_s": round(streamed, 2),
        "recorded_all_s": round(drained, 2),
        "max_terminal_backlog": max(backlog, default=0),
        "rss_growth_mb": round((rss_peak - rss_before) / 1024, 1),
    }


# -- the global bound on buffered bytes -------------------------------------------------------


def memory_bound_part(progress: Callable[[str], None]) -> dict[str, Any]:
    from streamvisor.testing import start_server

    bound = 2 * 1024 * 1024
    toml = '[plugins.scripted]\n[[plugins.scripted.models]]\nname = "long"\ntext = "' + "word " * 200 + '"\nrepeat = 100\ndelay = 0.01\n'
    progress(f"memory bound: long streams until {bound} bytes are buffered")
    admitted = refused = 0
    refusal: dict[str, Any] | None = None
    streams = []
    with start_server(toml, max_buffered_bytes=bound, log_level="warning") as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        try:
            deadline = time.monotonic() + 60
            while refusal is None and time.monotonic() < deadline:
                request = client.build_request("POST", "/v1/chat/completions", json={"model": "long", "stream": True, "messages": [{"role": "user", "content": "go"}]})
                response = client.send(request, stream=True)
                if response.status_code == 503:
                    refusal = {"status": 503, "retry_after": response.headers.get("Retry-After"), "code": json.loads(response.read())["error"]["code"]}
                    response.close()
                    refused += 1
                    break
                admitted += 1
                streams.append(response)
                # Let the buffers fill: read nothing yet.
                time.sleep(0.3)
            held = server.call(lambda: server.runtime.buffers.bytes)
        finally:
            for response in streams:
                response.close()
            client.close()
    return {"bound_bytes": bound, "admitted": admitted, "refused": refused, "refusal": refusal, "held_bytes_at_refusal": held}


# -- the parts by other modules ----------------------------------------------------------------


def optional(module: str, call: Callable[[Any], dict[str, Any]], progress: Callable[[str], None]) -> dict[str, Any]:
    try:
        imported = __import__(f"bench.{module}", fromlist=["run"])
    except ImportError as exc:
        progress(f"{module}: not available ({exc})")
        return {"skipped": str(exc)}
    return call(imported)


def pytest_part(files: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    present = [f for f in files if (ROOT / f).exists()]
    progress(f"pytest {' '.join(present)}")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *present], cwd=ROOT, capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|error|skipped)", summary)}
    return {"files": present, "summary": summary, "counts": counts, "seconds": round(time.perf_counter() - t0, 1), "returncode": done.returncode}


# -- the report ----------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    out = ["# Reliability", ""]
    out.append(
        "What streamvisor does under hostile upstreams, faults, disconnect storms, broken plugins and bad input, "
        "as numbers from one run of the suite of issue 9. Run it yourself to get yours:"
    )
    out += ["", "```sh", f".venv/bin/python -m bench.reliability{' --quick' if results['quick'] else ''}", "```", ""]
    m = results["machine"]
    out += [
        f"This run: {results['started']}, {results['seconds']:.0f} s, commit {results['commit']}, "
        f"{m['cpu_model']} ({m['nproc']} cores), Python {m['python']}, Linux {m['kernel']}. "
        "Fast subsets of every part run in `make test` (`tests/test_reliability.py`, `tests/test_faultmix.py`, "
        "`tests/test_storm.py`, `tests/test_plugin_faults.py`, `tests/test_fuzz.py`, `tests/test_properties.py`, "
        "`tests/test_security.py`).",
        "",
    ]
    h = results["hostile"]
    out += ["## Hostile upstreams", ""]
    out.append(
        f"Each case {h['per_case']} times (20 at once) through a gateway in its own process: the `openai` provider with "
        f"`read_timeout = {hostile.READ_TIMEOUT}`, `event_timeout = {hostile.EVENT_TIMEOUT}`, `max_event_bytes` 1 MiB "
        "(the default). A readable error is a 5xx envelope before the first chunk or a terminal error event after it."
    )
    out += ["", "| case | what the upstream does | readable errors | ended as | p50 s | max s | live after | upstream conns open after |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for name, c in h["cases"].items():
        out.append(f"| {name} | {c['what']} | {c['readable_errors']}/{c['requests']} | {', '.join(c['kinds'])} | {c['p50_s']} | {c['max_s']} | {c['live_after']} | {c['upstream_open_after']} |")
    out += [
        "",
        f"Gateway RSS: {h['rss_start_mb']} MB after start-up; {h['rss_warm_mb']} MB after a warm-up round of {h['per_case']} of each "
        f"case; {h['rss_after_mb']} MB after the measured round of {h['per_case']} of each ({h['rss_growth_pct']:+.1f} % over the "
        "warm-up; the bound is 10 %). The first round at 20 requests at once raises the allocator's high-water mark; three more "
        "rounds in a row stayed within about 1 % of it when this was checked, so it is a plateau, not a leak.",
        "",
    ]
    out.append(
        "Found by this suite, and fixed: an upstream that sent one event whose `data:` lines never ended grew the server "
        "by about 50 MB a request, and kept it. The SSE decoder bounded the partial line but not an event's data lines, "
        "and the failed session's error kept the decoder's frame alive through its traceback and chained cause for the "
        "whole retention time. Now an event or line over `max_event_bytes` fails the stream with `upstream_error`, and a "
        "failed session keeps its error without traceback or cause. Also found: a 200 with an HTML page, or a stream cut "
        "before `[DONE]` without a finish reason, used to end as an empty or truncated *successful* completion; a chunk of "
        "the wrong shape ended as a 500 from a Python `AttributeError`; a slow drip kept a stream alive forever."
    )
    out += [""]
    intro = {
        "faultmix": lambda p: (
            f"{p.get('requests')} streamed requests (`bench/faultmix.py`), {p.get('concurrency')} at once, through the `openai` "
            "provider with the `retry` (3 attempts) and `usage` plugins, to an upstream that answers each with a normal "
            "stream, a reset before or mid-stream, a 5xx, a 429 with `Retry-After`, silence or a malformed event "
            f"(`upstream_answers`). Every client got the complete stream ({p.get('completed')}) or a terminal error "
            f"({p.get('terminal_errors')}); other ends: {p.get('other')}. Sessions live after: {p.get('live_sessions_after')}; "
            f"upstream connections open beyond the idle pool: {p.get('upstream_open_beyond_pool')}, and after the gateway "
            f"stopped: {p.get('upstream_open_after_stop')}. The ledger against what clients were told, to the token: "
            f"{p.get('usage_mismatches')} mismatches ({p.get('ledger_totals_diff')} tokens apart in total). Duplicated chunks: "
            f"{p.get('duplicated_chunks')}, with {p.get('retries')} retries. (`attempts_unaccounted` counts announced retries "
            "whose attempt never reached the upstream, such as a connect that failed.)"
        ),
        "storm": lambda p: (
            f"{p.get('clients')} clients (`bench/storm.py`), {p.get('concurrency')} at once, against a gateway in its own process, "
            "drop at random points, a quarter each: before the headers, after the first chunk, mid-stream, and during a "
            f"retry's back-off. Upstream connections not closed: {p.get('upstream_not_closed')}; time from a client's close to "
            f"its upstream connection's close: p50 {p.get('close_ms_p50')} ms, p99 {p.get('close_ms_p99')} ms. Dropped streams "
            f"missing from the ledger: {p.get('not_in_ledger')}; with wrong partial usage: {p.get('partial_usage_wrong')}; "
            f"retries after a client left: {p.get('retries_after_drop')}. RSS {p.get('rss_before_mb')} MB before the storm, "
            f"{p.get('rss_after_mb')} MB after ({p.get('rss_growth_pct'):+} %; the bound is 5 %)."
        ),
    }
    for key, title in (("faultmix", "Fault mix"), ("storm", "Disconnect storm")):
        part = results.get(key) or {}
        out += [f"## {title}", ""]
        if "skipped" in part or not part:
            out += [f"Not run: {part.get('skipped', 'missing')}", ""]
            continue
        out += [intro[key](part), "", "| figure | value |", "|---|---:|"]
        for name, value in part.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            out.append(f"| {name} | {value} |")
        out.append("")
    pf = results["plugin_faults"]
    out += ["## Plugin faults", ""]
    out.append(
        "A test plugin raises, hangs, then returns garbage in each hook in turn (`bench/plugin_faults.py`); it misbehaves "
        "for the model `victim` only, and `fox` streams go through it too. Held means: streams of `fox` byte-identical to a "
        "server without the plugin, the fault counted against the plugin and shown by `/admin/plugins`, the server ready "
        "(except when the broken thing is its own readiness check), shutdown within its one grace period (1 s here) — or, "
        "for a start-up hook, start-up refused with a message naming the plugin and the hook."
    )
    out += ["", f"{pf['held']} of {pf['cases']} cases held.", "", "| hook | raise | hang | garbage |", "|---|---|---|---|"]
    for hook, modes in pf["matrix"].items():
        out.append(f"| {hook} | " + " | ".join(modes[m] for m in ("raise", "hang", "garbage")) + " |")
    out.append("")
    sl = results["slow_listener"]
    out += ["## Terminal events under a slow listener", ""]
    out.append(
        f"{sl['sessions']} streamed sessions at concurrency {sl['concurrency']}, and an async listener that takes "
        f"{sl['listener_ms_per_event']:.0f} ms per terminal event. Terminal events are never dropped; the bound on them "
        "is `[server] max_live_sessions` (live sessions plus the largest backlog of terminal events a listener has yet to "
        "handle), past which new sessions get 503 `overloaded` with `Retry-After: 1` (tests/test_plugin_contract.py)."
    )
    out += ["", "| figure | value |", "|---|---:|"]
    for name, value in sl.items():
        out.append(f"| {name} | {value} |")
    mb = results["memory_bound"]
    out += ["", "## The server-wide bound on buffered bytes", ""]
    out.append(
        f"`[server] max_buffered_bytes` = {mb['bound_bytes']} for this test (256 MiB by default): long streams are opened "
        f"and not read until the server refuses one. Admitted: {mb['admitted']}; then {json.dumps(mb['refusal'])}, with "
        f"{mb['held_bytes_at_refusal']} bytes held. The bound is checked when a session starts: a session already running "
        "may take its buffer past it, by at most `max_session_chunks` chunks."
    )
    out += ["", "## Fuzzing and security", ""]
    for key in ("fuzz", "security"):
        part = results[key]
        out.append(f"- `{' '.join(part['files']) or '(none)'}`: {part['summary']} ({part['seconds']} s)")
    out += [
        "",
        "The fuzzing runs schemathesis against `/openapi.json` (every operation, generated requests; no response may be "
        "a 5xx, every 4xx is the error envelope) and hypothesis properties of `ChatRequest.from_openai` and the SSE "
        "decoder. The security tests are listed in `docs/security.md`.",
        "",
    ]
    return "\n".join(out)


def table(results: dict[str, Any]) -> str:
    rows = [("part", "figure")]
    h = results["hostile"]
    ok = sum(c["readable_errors"] for c in h["cases"].values())
    total = sum(c["requests"] for c in h["cases"].values())
    rows.append(("hostile upstreams", f"{ok}/{total} readable errors, RSS {h['rss_growth_pct']:+.1f} %"))
    for key in ("faultmix", "storm"):
        part = results.get(key) or {}
        rows.append((key, "not run" if "skipped" in part else ", ".join(f"{k}={v}" for k, v in list(part.items())[:6])))
    pf = results["plugin_faults"]
    rows.append(("plugin faults", f"{pf['held']}/{pf['cases']} cases held"))
    sl = results["slow_listener"]
    rows.append(("slow listener", f"{sl['recorded']}/{sl['sessions']} recorded, {sl['dropped']} dropped, streams done in {sl['streams_done_s']} s, recorded in {sl['recorded_all_s']} s"))
    mb = results["memory_bound"]
    rows.append(("buffer bound", f"{mb['admitted']} admitted, then {mb['refusal']}"))
    for key in ("fuzz", "security"):
        rows.append((key, results[key]["summary"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--no-report", action="store_true", help="print, but do not write docs/reliability.md")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the servers of this run log their faults on purpose

    def progress(message: str) -> None:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    quick = args.quick
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "machine": machine(),
        "quick": quick,
    }
    with tempfile.TemporaryDirectory(prefix="streamvisor-reliability-") as folder:
        workdir = Path(folder)
        results["hostile"] = hostile_part(workdir, 10 if quick else 100, progress)
        results["faultmix"] = optional("faultmix", lambda m: m.run(requests=300 if quick else 10_000, progress=progress), progress)
        results["storm"] = optional("storm", lambda m: m.run(clients=100 if quick else 1000, progress=progress), progress)
    from streamvisor.testing import start_server

    from .plugin_faults import HOOKS, run_matrix

    progress("plugin faults: every hook, raise, hang, garbage")
    cases = run_matrix(start_server)
    matrix: dict[str, dict[str, str]] = {hook: {} for hook in HOOKS}
    for case in cases:
        if case.start != "started":
            cell = "refused: " + case.start.removeprefix("refused: ").split(": ", 1)[-1][:60]
        else:
            cell = "held" if case.held else "FAILED"
        if not case.held:
            cell = "FAILED: " + "; ".join(case.notes)
        matrix[case.hook][case.mode] = cell
    results["plugin_faults"] = {"cases": len(cases), "held": sum(c.held for c in cases), "matrix": matrix}
    results["slow_listener"] = slow_listener_part(300 if quick else 2000, 64, 0.02, progress)
    results["memory_bound"] = memory_bound_part(progress)
    results["fuzz"] = pytest_part(["tests/test_fuzz.py", "tests/test_properties.py", "tests/test_openapi.py"], progress)
    results["security"] = pytest_part(["tests/test_security.py"], progress)
    results["seconds"] = time.perf_counter() - t0
    print(table(results))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    (out / f"reliability-{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.no_report:
        REPORT.write_text(markdown(results))
        print(f"\nwrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
