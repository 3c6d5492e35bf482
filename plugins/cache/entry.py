"""Cache entries: an answer recorded as it streams by, its encoding for a
backend, and its replay as deltas."""

from __future__ import annotations

import time
from typing import Any

import attrs
import orjson

from streamvisor.hooks import Delta, Usage

#: Finish reasons of a complete answer; anything else (content_filter, none at
#: all, stopped) is not stored.
STORABLE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
#: Entry format version; an entry of another version is ignored (a miss).
ENTRY_VERSION = 1


@attrs.frozen
class Entry:
    """A cached answer: its chunks as (content, reasoning, tool_calls,
    finish_reason) pieces, and the usage the original answer reported."""

    model: str
    created: float
    pieces: list[list[Any]]
    usage: Usage | None

    def encode(self) -> bytes:
        usage = None
        if self.usage is not None:
            u = self.usage
            usage = [u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.exact]
        return orjson.dumps({"v": ENTRY_VERSION, "model": self.model, "created": self.created, "usage": usage, "chunks": self.pieces})

    @classmethod
    def decode(cls, blob: bytes) -> "Entry":
        data = orjson.loads(blob)
        if not isinstance(data, dict) or data.get("v") != ENTRY_VERSION:
            raise ValueError("not a cache entry of this version")
        usage = data.get("usage")
        return cls(
            model=data["model"],
            created=float(data["created"]),
            pieces=data["chunks"],
            usage=None if usage is None else Usage(int(usage[0]), int(usage[1]), int(usage[2]), bool(usage[3])),
        )

    def deltas(self) -> list[Delta]:
        """The chunks to replay; the last one carries the original usage."""
        out = []
        for piece in self.pieces:
            content, reasoning, tool_calls, finish = (list(piece) + [None] * 4)[:4]
            out.append(Delta(content=content, reasoning=reasoning, tool_calls=tool_calls, finish_reason=finish))
        if out and self.usage is not None:
            out[-1] = attrs.evolve(out[-1], usage=self.usage)
        return out


class Recorder:
    """Collects the visible pieces of an answer as they stream by, up to a bound.

    An answer that outgrows `limit` is dropped at once (its pieces are freed)
    and will not be stored, so a long stream costs no more than `limit`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pieces: list[list[Any]] = []
        self.size = 0
        self.oversize = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, delta: Delta) -> None:
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if self.oversize:
            return
        piece = [delta.content or None, delta.reasoning or None, delta.tool_calls or None, delta.finish_reason]
        while piece and piece[-1] is None:
            piece.pop()
        if not piece:
            return  # a role-only or usage-only delta: nothing to replay
        # An estimate (characters, not bytes); the encoded entry is checked exactly.
        self.size += 16 + len(piece[0] or "") + (len(piece[1] or "") if len(piece) > 1 else 0)
        if len(piece) > 2 and piece[2]:
            self.size += len(orjson.dumps(piece[2]))
        if self.size > self.limit:
            self.oversize = True
            self.pieces = []
            return
        self.pieces.append(piece)

    def entry(self, model: str) -> Entry | None:
        """The entry to store, or None when the answer is not complete or too big."""
        if self.oversize or self.finish_reason not in STORABLE_FINISH_REASONS or not self.pieces:
            return None
        return Entry(model=model, created=time.time(), pieces=self.pieces, usage=self.usage)
