"""The `reasoning` plugin: `<think>…</think>` in a provider's content becomes
reasoning.

Models served through OpenAI-compatible servers often stream their reasoning
inline, between `<think>` and `</think>`. This plugin's per-session chunk
transformer (`ThinkParser`) moves that text into `reasoning` deltas (sent as
`reasoning_content`), holding back only what could be a partial tag, and counts
the completion tokens that were reasoning when the provider's usage does not
(restating the delta's `Usage` with `reasoning_tokens`).

Each session gets its own parser when it starts; its state ends with the
session. A session whose provider reports reasoning tokens itself keeps the
provider's counts.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs

from streamvisor.hooks import Delta, Session, Usage, hookimpl


def _tag(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    # The tag's length bounds what the parser holds back per session.
    if not 1 <= len(value) <= 64 or any(c.isspace() for c in value):
        raise ValueError(f"{attribute.name} must be 1 to 64 characters without whitespace, got {value!r}")


@attrs.frozen
class Settings:
    think_open: str = attrs.field(default="<think>", validator=_tag)
    think_close: str = attrs.field(default="</think>", validator=_tag)

    def __attrs_post_init__(self) -> None:
        if self.think_open == self.think_close:
            raise ValueError("think_open and think_close must differ")


# -- the parser -------------------------------------------------------------------


@attrs.define(slots=True)
class _Segment:
    """The characters one usage report covers, and how many were reasoning."""

    pending: int  # not classified yet (held back as a possible partial tag)
    chars: int
    reasoning: int = 0
    tokens: int | None = None  # the report's token increment; None until it comes


class ThinkParser:
    """One session's `<think>` state: inside or outside a block, the held-back
    text that may be a partial tag, and which tokens were reasoning.

    Token counting: each usage report's increment of `completion_tokens` is
    spread over the characters received since the previous report, in
    proportion to how many of them were reasoning (tag characters count as
    reasoning). With one delta per token (the local model) this counts exactly
    the tokens that were reasoning; with a usage report only at the end it is an
    estimate by characters. Segments wait only for held-back characters, so at
    most a tag's length of them exist at once.
    """

    __slots__ = (
        "open_tag", "close_tag", "in_think", "held", "skip_space", "tracking", "segments",
        "unsettled_chars", "last_completion", "last_usage", "reasoning", "stated", "provider_counts",
    )

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.in_think = False
        self.held = ""
        #: After a tag, leading whitespace is dropped ("<think>\n", "</think>\n\n").
        self.skip_space = False
        #: Token attribution starts with the first delta that may hold a tag.
        self.tracking = False
        self.segments: collections.deque[_Segment] = collections.deque()
        self.unsettled_chars = 0
        self.last_completion = 0
        self.last_usage: Usage | None = None
        self.reasoning = 0.0
        self.stated = 0
        #: The provider reports reasoning tokens itself: never restate its usage.
        self.provider_counts = False

    # -- text ---------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, str]:
        """Parse the next piece of content; return (content, reasoning) to send."""
        if not self.tracking:
            self.tracking = True
            if self.unsettled_chars:
                # Characters since the last usage report, all content so far.
                self.segments.append(_Segment(pending=0, chars=self.unsettled_chars))
        self._receive(len(text))
        buf = self.held + text if self.held else text
        self.held = ""
        content: list[str] = []
        reasoning: list[str] = []
        i, end = 0, len(buf)
        while i < end:
            if self.skip_space:
                j = i
                while j < end and buf[j].isspace():
                    j += 1
                self._classify(j - i, self.in_think)
                i = j
                if i == end:
                    break
                self.skip_space = False
            tag = self.close_tag if self.in_think else self.open_tag
            out = reasoning if self.in_think else content
            found = buf.find(tag, i)
            if found < 0:
                keep = _partial_suffix(buf, i, tag)
                if end - keep > i:
                    out.append(buf[i : end - keep])
                    self._classify(end - keep - i, self.in_think)
                self.held = buf[end - keep :]
                break
            if found > i:
                out.append(buf[i:found])
                self._classify(found - i, self.in_think)
            self._classify(len(tag), True)
            self.in_think = not self.in_think
            self.skip_space = True
            i = found + len(tag)
        return "".join(content), "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        """The stream is ending: what was held back was not a tag after all."""
        held, self.held = self.held, ""
        if not held:
            return "", ""
        self._classify(len(held), self.in_think)
        return ("", held) if self.in_think else (held, "")

    # -- tokens -------------------------------------------------------------------

    def account(self, usage: Usage | None, text_chars: int) -> Usage | None:
        """Take this delta's usage into account; return the usage to restate on
        the delta (with the reasoning tokens counted so far), or None to leave it."""
        if not self.tracking:
            self.unsettled_chars += text_chars
        if usage is not None:
            if usage.reasoning_tokens:
                self.provider_counts = True
            added = max(0, usage.completion_tokens - self.last_completion)
            self.last_completion = usage.completion_tokens
            self.last_usage = usage
            if self.tracking:
                self._close(added)
            else:
                self.unsettled_chars = 0
        if not self.tracking or self.provider_counts or self.last_usage is None:
            return None
        self._settle()
        counted = min(int(self.reasoning + 0.5), self.last_usage.completion_tokens)
        if counted == self.stated and (usage is None or counted == 0):
            return None
        self.stated = counted
        return attrs.evolve(self.last_usage, reasoning_tokens=counted)

    # -- the chunk transformer ------------------------------------------------------

    def transform(self, delta: Delta) -> Delta:
        text = delta.content or ""
        if not (self.tracking or self.held or self.open_tag[0] in text):
            # The common case: no tag seen, none held back, and none can start in
            # this text.
            if delta.usage is None and not self.tracking:
                self.unsettled_chars += len(text)  # what account() does for it, without the call
            else:
                self.account(delta.usage, len(text))
            return delta
        content, reasoning = self.feed(text)
        if delta.finish_reason is not None:
            more_content, more_reasoning = self.flush()
            content += more_content
            reasoning += more_reasoning
        usage = self.account(delta.usage, len(text))
        changes: dict[str, Any] = {}
        if content != text:
            changes["content"] = content or None
        if reasoning:
            changes["reasoning"] = (delta.reasoning or "") + reasoning
        if usage is not None:
            changes["usage"] = usage
        return attrs.evolve(delta, **changes) if changes else delta

    def _receive(self, chars: int) -> None:
        if not chars:
            return
        last = self.segments[-1] if self.segments else None
        if last is not None and last.tokens is None:
            last.chars += chars
            last.pending += chars
        else:
            self.segments.append(_Segment(pending=chars, chars=chars))

    def _close(self, tokens: int) -> None:
        last = self.segments[-1] if self.segments else None
        if last is not None and last.tokens is None:
            last.tokens = tokens
        elif last is not None and last.chars == 0:
            last.tokens = (last.tokens or 0) + tokens  # merged: keeps the deque bounded
        elif tokens:
            self.segments.append(_Segment(pending=0, chars=0, tokens=tokens))

    def _classify(self, chars: int, reasoning: bool) -> None:
        for segment in self.segments:
            if not chars:
                return
            if segment.pending:
                take = min(chars, segment.pending)
                segment.pending -= take
                if reasoning:
                    segment.reasoning += take
                chars -= take

    def _settle(self) -> None:
        segments = self.segments
        while segments and segments[0].tokens is not None and segments[0].pending == 0:
            segment = segments.popleft()
            if segment.chars:
                self.reasoning += segment.tokens * segment.reasoning / segment.chars
            elif self.in_think:
                # Tokens without text (an unfinished UTF-8 sequence, an end token)
                # belong to the block they arrived in.
                self.reasoning += segment.tokens


def _partial_suffix(buf: str, start: int, tag: str) -> int:
    """The length of the longest end of `buf[start:]` that begins `tag`."""
    limit = min(len(tag) - 1, len(buf) - start)
    if limit <= 0 or tag[0] not in buf[len(buf) - limit :]:
        return 0
    for k in range(limit, 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


class ReasoningPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @hookimpl
    def register_chunk_transformers(self, register: Any) -> None:
        register(self.parser)

    def parser(self, session: Session) -> Any:
        """A session starts: its own parser's `transform`."""
        return ThinkParser(self.settings.think_open, self.settings.think_close).transform
