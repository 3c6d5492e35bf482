"""What the cluster plugin writes to Redis, and reads back.

Keys, under the plugin's `key_prefix`:

- ``members``: a set of the instance ids that joined; ``member:<id>``: the
  instance's last beat (JSON), expiring `dead_after_seconds` after it was
  written. An id in the set whose beat key is gone is a dead instance.
- ``reaped:<id>``: who marks a dead instance's sessions interrupted (SET NX).
- ``dir:<session id>``: the session directory entry (JSON: owner, identity,
  team, model, created, include_usage, background).
- ``chunks:<session id>``: a Redis stream of a published session's chunks.
  An entry's id is ``<offset of its first chunk>-1``, so a follower finds the
  entry holding offset N with one XREVRANGE. Field ``d`` holds a batch of
  deltas; the last entry, with field ``end``, the session's end. Trimmed to
  `max_stream_entries` and expiring `stream_ttl_seconds` after the end.
- channel ``cmd:<id>``: commands to an instance, and replies to its commands.
"""

from __future__ import annotations

from typing import Any

import orjson

from streamvisor.hooks import Delta, Usage, delta_from_json


def decode_deltas(data: bytes) -> list[Delta]:
    """A stream entry's `d` field (`deltas_to_json`) as deltas again."""
    return [delta_from_json(item) for item in orjson.loads(data)]


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "p": usage.prompt_tokens,
        "c": usage.completion_tokens,
        "r": usage.reasoning_tokens,
        "x": usage.exact,
        "k": usage.cached_tokens,
        "$": usage.cost_usd,
    }


def usage_of(data: dict[str, Any] | None) -> Usage | None:
    if not data:
        return None
    return Usage(data["p"], data["c"], data["r"], exact=data["x"], cached_tokens=data.get("k", 0), cost_usd=data.get("$"))


def entry_id(first_offset: int) -> str:
    return f"{first_offset}-1"


def first_offset(entry: bytes) -> int:
    return int(entry.split(b"-", 1)[0])


def fields(raw: list[Any]) -> dict[bytes, bytes]:
    """A stream entry's flat field list as a dict."""
    return {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
