"""Statistics and presentation of results.

Owns: percentiles and summaries of samples, the text table printed at the end of
a run, and writing the JSON result file under `bench/results/`. It knows the
shape of the result document but nothing about how numbers were measured.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"

#: Cells that read as numbers (with a unit) are right-aligned.
_NUMBER = re.compile(r"^-?[\d.]+( ?(%|ns|us|ms|s|KB|MB))?$")


# -- statistics ------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summary(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """n, mean, min, p50, p90, p99, max of `values` (None for the statistics when empty)."""
    data = sorted(values)
    if not data:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "n": len(data),
        "mean": round(sum(data) / len(data), digits),
        "min": round(data[0], digits),
        "p50": round(percentile(data, 50), digits),
        "p90": round(percentile(data, 90), digits),
        "p99": round(percentile(data, 99), digits),
        "max": round(data[-1], digits),
    }


# -- the table -------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    """A Markdown table; numbers are right-aligned, text left-aligned."""
    cells = [[_fmt(c, digits) for c in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None or _NUMBER.match(str(r[i])) for r in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + (":" if numeric[i] else "-") for i, w in enumerate(widths)) + "|"
    body = ["| " + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in cells]
    return "\n".join([line, rule, *body])


#: Above this share of a core used by other processes during a run, the table warns.
OTHER_CPU_WARNING = 0.10

THROUGHPUT_HEADERS = [
    "scenario", "conc", "req/s", "x direct", "p50 ms", "p99 ms", "+p50 ms", "TTFC p50", "TTFC p99", "errors", "srv CPU", "other CPU",
]


def throughput_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, scenario in results.get("scenarios", {}).items():
        for run in scenario.get("runs", []):
            latency, ttfc = run["latency_ms"], run["ttfc_ms"]
            cpu = run.get("cpu", {}).get("server")
            other = run.get("cpu", {}).get("other")
            rows.append([
                name,
                run["concurrency"],
                run["rps"],
                run.get("ratio_to_direct"),
                latency["p50"],
                latency["p99"],
                run.get("added_p50_ms"),
                ttfc["p50"],
                ttfc["p99"],
                run["errors"],
                None if cpu is None else f"{cpu * 100:.0f}%",
                None if other is None else f"{other * 100:.0f}%",
            ])
    return rows


def render(results: dict[str, Any]) -> str:
    """The whole result document as text: one table per part that ran."""
    out: list[str] = []
    m = results["machine"]
    out.append(f"streamvisor benchmark {results['started']} on {m['cpu_model']} ({m['nproc']} cores), Python {m['python']}")
    source, end = results.get("source"), results.get("source_at_end")
    if source:
        dirty = f" + uncommitted changes to {', '.join(source['dirty'])}" if source["dirty"] else ""
        out.append(f"streamvisor at commit {source['commit']}{dirty}")
        if end and end["digest"] != source["digest"]:
            out.append("WARNING: the sources changed during the run (commit %s -> %s): parts ran different code" % (source["commit"], end["commit"]))
    rows = throughput_rows(results)
    if rows:
        out.append("")
        out.append("Streams (50 content chunks + usage + [DONE]; latencies in ms; x direct = req/s ratio to scenario direct;")
        out.append("+p50 = p50 latency added over direct; srv CPU = CPU of the server process, 100% = one core;")
        out.append("other CPU = CPU used meanwhile by processes outside the benchmark)")
        out.append(table(THROUGHPUT_HEADERS, rows))
        stack = [r for r in results["scenarios"].get("default_stack", {}).get("runs", []) if "ratio_to_provider" in r]
        if stack:
            out.append(
                "default stack / provider alone, req/s paired by round (median): "
                + ", ".join(f"{r['ratio_to_provider']:.3f} at concurrency {r['concurrency']}" for r in stack)
            )
        busy = [f"{name}@{run['concurrency']}" for name, sc in results["scenarios"].items() for run in sc["runs"] if run.get("cpu", {}).get("other", 0) > OTHER_CPU_WARNING]
        if busy:
            out.append(f"WARNING: other processes used more than {OTHER_CPU_WARNING:.0%} of a core during {', '.join(busy)}: those numbers are pessimistic")
    memory = results.get("memory")
    if memory:
        out.append("")
        out.append("Memory (RSS of the streamvisor process)")
        if "skipped" in memory:
            out.append(f"  skipped: {memory['skipped']}")
        else:
            out.append(table(
                ["what", "value"],
                [
                    ["RSS after start-up", f"{memory['rss_startup_kb'] / 1024:.1f} MB"],
                    ["RSS after warm-up", f"{memory['rss_warm_kb'] / 1024:.1f} MB"],
                    [f"RSS with {memory['streams']} streams open", f"{memory['rss_open_kb'] / 1024:.1f} MB"],
                    ["per open stream", f"{memory['kb_per_stream']:.1f} KB"],
                    ["RSS at the end (streams done or timed out)", f"{memory['rss_after_kb'] / 1024:.1f} MB"],
                    ["streams completed", f"{memory['completed']}/{memory['streams']} (within {memory.get('timeout_seconds', 0):.0f} s)"],
                    ["time to open them all", f"{memory['open_seconds']:.1f} s"],
                    ["then, time until the last completed", "-" if memory.get("complete_seconds") is None else f"{memory['complete_seconds']:.1f} s"],
                    *_floor_rows(memory.get("floor")),
                ],
            ))
            if memory.get("capped"):
                out.append(f"  note: {memory['capped']}")
    cancel = results.get("cancellation")
    if cancel:
        out.append("")
        out.append("Cancellation (client disconnect -> upstream connection closed)")
        if "skipped" in cancel:
            out.append(f"  skipped: {cancel['skipped']}")
        else:
            d = cancel["delay_ms"]
            out.append(table(
                ["disconnects", "upstream closed", "p50 ms", "p90 ms", "p99 ms", "max ms", "not closed"],
                [[cancel["disconnects"], d["n"], d["p50"], d["p90"], d["p99"], d["max"], cancel["not_closed"]]],
            ))
    micro = results.get("micro")
    if micro:
        out.append("")
        out.append("Micro (in-process)")
        out.append(table(["what", "cost", "note"], [[r["name"], r["value"], r.get("note", "")] for r in micro["rows"]]))
    local = results.get("local_model")
    if local:
        out.append("")
        out.append("Local model (tokens/s)")
        if "skipped" in local:
            out.append(f"  skipped: {local['skipped']}")
        else:
            out.append(table(
                ["path", "tokens", "tokens/s (whole request)", "tokens/s (decode)", "runs"],
                [
                    ["llama-cpp-python direct", local["direct"]["tokens"], local["direct"]["tps"], local["direct"]["decode_tps"], local["runs"]],
                    ["through streamvisor", local["streamvisor"]["tokens"], local["streamvisor"]["tps"], local["streamvisor"]["decode_tps"], local["runs"]],
                ],
            ))
            pairs = ", ".join(f"{r:.3f}" for r in local.get("ratio_runs", []))
            out.append(
                f"  streamvisor / direct: {local['ratio']:.3f} (median of the runs paired in time: {pairs or '-'}), "
                f"{local['decode_ratio']:.3f} (decode, medians); same text: {local['same_text']}"
            )
    profile = results.get("profile")
    if profile and "skipped" in profile:
        out.append("")
        out.append(f"Profile: skipped: {profile['skipped']}")
    if profile and "top_self" in profile:
        out.append("")
        out.append(f"Profile of the server ({profile['scenario']}, concurrency {profile['concurrency']}, {profile['samples']} samples)")
        out.append(table(["self %", "function"], [[f"{r['percent']:.1f}", r["frame"]] for r in profile["top_self"][:15]]))
    return "\n".join(out)


# -- files -----------------------------------------------------------------------


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S")


def write_json(results: dict[str, Any], directory: Path = RESULTS, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name or results.get('started') or timestamp()}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def _floor_rows(floor: dict[str, Any] | None) -> list[list[str]]:
    """The relay floor's rows of the memory table (bench/hello.py, kind relay)."""
    if not floor:
        return []
    if "error" in floor:
        return [["floor: quart-trio relay route", f"failed: {floor['error']}"]]
    return [
        ["floor: quart-trio relay route, RSS after warm-up", f"{floor['rss_warm_kb'] / 1024:.1f} MB"],
        ["floor: per open stream", f"{floor['kb_per_stream']:.1f} KB ({floor['completed']} completed)"],
    ]


class Paired:
    """Figures of variants run alternately in rounds against a `base` variant
    (bench.store, bench.keys): `rounds[name][round][level][key]`."""

    def __init__(self, rounds: dict[str, list[dict[int, dict[str, Any]]]], levels: Sequence[int], base: str = "without") -> None:
        self.rounds = rounds
        self.levels = list(levels)
        self.base = base
        self.others = [name for name in rounds if name != base]

    def median(self, name: str, level: int, key: str) -> float:
        """The median over the rounds of one figure."""
        return statistics.median(r[level][key] for r in self.rounds[name])

    def ratio(self, name: str, level: int) -> float:
        """The median of `name`'s req/s over the base's, paired within each round."""
        return statistics.median(v[level]["rps"] / b[level]["rps"] for v, b in zip(self.rounds[name], self.rounds[self.base]))

    def tables(self, what: str) -> str:
        """req/s with each variant's paired ratio, then server CPU per request."""
        base, others = self.base, self.others
        lines = [
            f"{len(self.rounds[base])} rounds, interleaved; medians of the rounds; {what}/{base} is paired within each round",
            "",
            f"| concurrency | {base} req/s | " + " | ".join(f"{o} req/s | {o}/{base}" for o in others) + " |",
            "|---:" * (2 + 2 * len(others)) + "|",
        ]
        for level in self.levels:
            cells = [f"{self.median(base, level, 'rps'):.0f}"] + [f"{self.median(o, level, 'rps'):.0f} | {self.ratio(o, level):.3f}" for o in others]
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines += ["", "Server CPU per request, ms (lower is better):", "", f"| concurrency | {base} | " + " | ".join(others) + " |", "|---:" * (2 + len(others)) + "|"]
        for level in self.levels:
            lines.append(f"| {level} | " + " | ".join(f"{self.median(n, level, 'cpu_ms'):.2f}" for n in [base, *others]) + " |")
        return "\n".join(lines)
