"""The local model: tokens/s through streamvisor versus llama-cpp-python directly.

Owns: both sides of that comparison, with the same model file, the same settings
(the `[plugins.local]` table of the repository's plugins.toml), the same prompt
tokens (made by the provider's own `tokenize`), temperature 0 and the same token
limit.

- Direct: a subprocess (`python -m bench.localmodel direct`) loads the model the
  way the provider does (`LocalProvider.load`) and runs the provider's loop over
  `Llama.generate` in one thread, with no server and no per-token thread hop.
- Through streamvisor: `streamvisor serve` with only the local provider, one
  streamed request at a time over HTTP.

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
    progress("local model: through streamvisor")
    proc = servers.start_streamvisor(workdir, servers.gateway_config(None, local=settings), name="streamvisor-local")
    try:
        stream_once(proc.port, model, prompt, 8)  # warm-up
        sv_runs, sv_text = [], ""
        for _ in range(runs):
            rates, sv_text = stream_once(proc.port, model, prompt, max_tokens)
            sv_runs.append(rates)
    finally:
        proc.stop()
    progress("local model: llama-cpp-python directly")
    out = workdir / "local-direct.json"
    child = servers.Proc("local-direct", [servers.PYTHON, "-m", "bench.localmodel", "direct", "--runs", str(runs), "--max-tokens", str(max_tokens), "--out", str(out)], workdir)
    code = child.popen.wait(600)
    child.stop()
    if code != 0:
        raise RuntimeError(f"the direct llama-cpp-python run failed:\n{child.log_tail()}")
    direct_side = json.loads(out.read_text())
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
        "ratio": round(sv_side["tps"] / direct_side["tps"], 3),
        "decode_ratio": round(sv_side["decode_tps"] / direct_side["decode_tps"], 3),
        "same_text": sv_text == direct_side["text"],
        "text": sv_text,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.localmodel")
    p.add_argument("side", choices=["direct"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = direct(args.max_tokens, args.runs, args.prompt)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
