"""Cache keys and policy: what identifies an answer, and which requests may be cached."""

from __future__ import annotations

import hashlib
import re

import orjson

from streamvisor.hooks import ChatRequest

#: A cache key: the sha256 hex digest `cache_key` makes (and X-Cache-Key shows).
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def cache_key(request: ChatRequest, model: str) -> str:
    """The sha256 of the canonical form of everything that changes the answer.

    `model` is the canonical model (provider and the provider's model name), so
    that aliases share entries. `stream`, `stream_options`, `user` and the
    caller's identity are left out: they do not change the text.
    """
    canonical = {
        "model": model,
        "messages": request.messages,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": request.stop,
        "seed": request.seed,
        "extra": request.extra,
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def bypass_reason(request: ChatRequest, cache_unset_temperature: bool, cache_nonzero_temperature: bool) -> str | None:
    """Why `request` must not be cached, or None when it may be."""
    temperature = request.temperature
    if temperature is None:
        return None if cache_unset_temperature else "unset_temperature"
    if temperature > 0 and not cache_nonzero_temperature:
        return "nonzero_temperature"
    return None
