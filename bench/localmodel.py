"""The local model: tokens/s through streamvisor versus llama-cpp-python directly.

Owns: both sides of that comparison, with the same model file, the same settings
(the `[plugins.local]` table of the repository's plugins.toml), the same prompt
tokens (made by the provider's own `tokenize`), temperature 0 and the same token
limit.

- Direct: a subprocess (`python -m bench.localmodel direct`) loads the model the
  way the provider does (`LocalProvider.load`) and runs the provider's loop over
  `Llama.generate` in one thread, with no server and no per-token thread hop.
- Through streamvisor: `streamvisor serve` with only the local provider, one
  streamed request at a time over HTTP, from a client process at nice 10 (the
  harness should take as little CPU from the model as it can).

Each side reports tokens/s over the whole request (prompt evaluation included)
and over decoding only (from the first token on), as medians of `runs` runs
after one warm-up run. The generated texts are compared: at temperature 0 both
sides must produce the same tokens.
"""

from __future__ import annotations

import argparse
import codecs
import http.client
import json
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MAX_TOKENS = 128


def local_settings() -> dict[str, Any]:
    """The [plugins.local] table of the repository's plugins.toml (or defaults)."""
    from .servers import REPO_CONFIG

    data = tomllib.loads(REPO_CONFIG.read_text())
    table = dict(data.get("plugins", {}).get("local", {}))
    table.pop("enabled", None)
    return table


def _rates(tokens: int, t0: float, t_first: float | None, t_end: float) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "seconds": round(t_end - t0, 4),
        "tps": round(tokens / (t_end - t0), 2) if t_end > t0 else None,
        "decode_tps": round((tokens - 1) / (t_end - t_first), 2) if t_first is not None and tokens > 1 and t_end > t_first else None,
    }


def _median_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens": runs[-1]["tokens"],
        "tps": round(statistics.median(r["tps"] for r in runs), 2),
        "decode_tps": round(statistics.median(r["decode_tps"] for r in runs if r["decode_tps"]), 2),
        "runs": runs,
    }


# -- direct ------------------------------------------------------------------------------


def direct(max_tokens: int, runs: int, prompt: str) -> dict[str, Any]:
    import trio

    from streamvisor.core.chat import ChatRequest
    from streamvisor.plugins.local import LocalProvider, Settings
    from streamvisor.config import build_settings

    settings = build_settings(Settings, local_settings(), source="plugins.toml", prefix="plugins.local")
    provider = LocalProvider(settings)
    trio.run(provider.load)
    llm = provider.llm
    request = ChatRequest(model=settings.model, messages=({"role": "user", "content": prompt},), stream=True, max_tokens=max_tokens, temperature=0.0, seed=0)

    def once(limit: int) -> tuple[dict[str, Any], str]:
        t0 = time.monotonic()
        prompt_tokens = provider.tokenize(request)
        llm.set_seed(0)
        tokens = llm.generate(prompt_tokens, top_k=settings.top_k, top_p=settings.top_p, temp=0.0, repeat_penalty=settings.repeat_penalty, reset=True)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text, generated, t_first = [], 0, None
        try:
            while generated < limit:
                token = next(tokens, None)
                if token is None:
                    break
                generated += 1
                if t_first is None:
                    t_first = time.monotonic()
                if token in provider._end_tokens:
                    break
                text.append(decoder.decode(llm.detokenize([token])))
        finally:
            tokens.close()
        text.append(decoder.decode(b"", final=True))
        return _rates(generated, t0, t_first, time.monotonic()), "".join(text)

    prompt_tokens = len(provider.tokenize(request))
    once(8)  # warm-up
    if runs == 0:
        # Serve runs on demand, one per line "run" on stdin, one JSON line each,
        # so that the caller can interleave them with the other side's runs.
        print(json.dumps({"ready": True, "prompt_tokens": prompt_tokens}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            rates, text = once(max_tokens)
            print(json.dumps({**rates, "text": text}), flush=True)
        llm.close()
        return {}
    results, text = [], ""
    for _ in range(runs):
        rates, text = once(max_tokens)
        results.append(rates)
    llm.close()
    return {**_median_side(results), "text": text, "prompt_tokens": prompt_tokens}


# -- through streamvisor --------------------------------------------------------------


def stream_once(port: int, model: str, prompt: str, max_tokens: int) -> tuple[dict[str, Any], str]:
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"streamvisor answered {response.status}: {response.read()[:300]!r}")
    # While tokens arrive the client only keeps the lines (and notes the first
    # one): parsing JSON per token here would take CPU from the model on the same
    # two cores, which the direct side does not pay. Parsed after the clock stops.
    t_first, lines = None, []
    for raw in response:
        if t_first is None and raw.startswith(b"data: {"):
            t_first = time.monotonic()
        lines.append(raw)
    t_end = time.monotonic()
    conn.close()
    text, tokens = [], 0
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", ()):
            content = choice["delta"].get("content")
            if content:
                text.append(content)
    return _rates(tokens, t0, t_first, t_end), "".join(text)


def measure(workdir: Path, runs: int = 3, max_tokens: int = MAX_TOKENS, prompt: str = PROMPT, progress: Any = print) -> dict[str, Any]:
    """Both sides, one after the other (never at the same time: they share the cores)."""
    from . import servers

    if not servers.env_has_local_model():
        return {"skipped": "streamvisor[local] is not installed (llama-cpp-python and the packaged model)"}
    settings = local_settings()
    model = settings.get("model", "gemma-3-270m")
    progress(f"local model: {runs} runs a side, interleaved (streamvisor, direct, streamvisor, ...)")
    proc = servers.start_streamvisor(workdir, servers.gateway_config(None, local=settings), name="streamvisor-local")
    # Direct: a process of its own with the model loaded, running one generation
    # per line on its stdin, so that its runs interleave with streamvisor's and
    # each pair sees the machine in the same state.
    direct_proc = subprocess.Popen(
        [servers.PYTHON, "-m", "bench.localmodel", "direct", "--runs", "0", "--max-tokens", str(max_tokens), "--prompt", prompt],
        cwd=servers.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(workdir / "local-direct.log").open("wb"), text=True,
    )
    try:
        assert direct_proc.stdin is not None and direct_proc.stdout is not None
        ready = json.loads(direct_proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise RuntimeError(f"the direct llama-cpp-python side did not start: {(workdir / 'local-direct.log').read_text()[-2000:]}")
        sv_runs, direct_runs, sv_text, direct_text = [], [], "", ""
        for i in range(runs + 1):  # the first pair warms both sides up
            # A pause before each run: the other side's OpenMP threads spin for a
            # moment after its last token, and would be charged to this one.
            time.sleep(0.5)
            rates, text = _client_run(workdir, proc.port, model, prompt, max_tokens)
            time.sleep(0.5)
            direct_proc.stdin.write("run\n")
            direct_proc.stdin.flush()
            line = json.loads(direct_proc.stdout.readline())
            if i:
                sv_runs.append(rates)
                sv_text = text
                direct_text = line.pop("text")
                direct_runs.append(line)
    finally:
        proc.stop()
        if direct_proc.stdin is not None:
            direct_proc.stdin.close()
        try:
            direct_proc.wait(30)
        except subprocess.TimeoutExpired:
            direct_proc.kill()
    direct_side = {**_median_side(direct_runs), "text": direct_text, "prompt_tokens": ready["prompt_tokens"]}
    paired = sorted(s["tps"] / d["tps"] for s, d in zip(sv_runs, direct_runs))
    sv_side = _median_side(sv_runs)
    return {
        "prompt": prompt,
        "prompt_tokens": direct_side["prompt_tokens"],
        "max_tokens": max_tokens,
        "temperature": 0,
        "runs": runs,
        "settings": settings,
        "direct": {k: v for k, v in direct_side.items() if k != "text"},
        "streamvisor": sv_side,
        "ratio": round(paired[len(paired) // 2], 3),
        "ratio_runs": [round(r, 3) for r in paired],
        "ratio_of_medians": round(sv_side["tps"] / direct_side["tps"], 3),
        "decode_ratio": round(sv_side["decode_tps"] / direct_side["decode_tps"], 3),
        "same_text": sv_text == direct_side["text"],
        "text": sv_text,
    }


def _client_run(workdir: Path, port: int, model: str, prompt: str, max_tokens: int) -> tuple[dict[str, Any], str]:
    """One streamed request through streamvisor, from a client process at nice 10:
    the client is the harness, not the system under test, and should take as
    little as it can from the model's threads on the same cores (the direct side
    has no client at all)."""
    from . import servers

    out = workdir / "local-client.json"
    client = servers.Proc(
        "local-client",
        [servers.PYTHON, "-m", "bench.localmodel", "client", "--port", str(port), "--model", model,
         "--runs", "1", "--max-tokens", str(max_tokens), "--prompt", prompt, "--out", str(out)],
        workdir,
        nice=10,
    )
    code = client.popen.wait(600)
    client.stop()
    if code != 0:
        raise RuntimeError(f"the local-model client failed:\n{client.log_tail()}")
    result = json.loads(out.read_text())
    return result["runs"][0], result["text"]


def client(port: int, model: str, max_tokens: int, runs: int, prompt: str) -> dict[str, Any]:
    """`runs` streamed requests through streamvisor (`python -m bench.localmodel client`)."""
    results, text = [], ""
    for _ in range(runs):
        rates, text = stream_once(port, model, prompt, max_tokens)
        results.append(rates)
    return {"runs": results, "text": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.localmodel")
    p.add_argument("side", choices=["direct", "client"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--port", type=int, help="streamvisor's port (side client)")
    p.add_argument("--model", help="the model name (side client)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.side == "client":
        result = client(args.port, args.model, args.max_tokens, args.runs, args.prompt)
    else:
        result = direct(args.max_tokens, args.runs, args.prompt)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
