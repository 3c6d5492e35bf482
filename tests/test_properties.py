"""Properties of the two parsers that read what clients and upstreams send:
`ChatRequest.from_openai` (a request body) and `SSEDecoder` (an upstream's event
stream), over inputs hypothesis makes up. Example counts are modest and the
runs derandomized, so `make test` stays quick and the same each time."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvisor.core.chat import ROLES, ChatRequest
from streamvisor.core.errors import APIError, InvalidRequest
from streamvisor.core.sse import SSEBoundError, SSEDecoder

PROPERTY = settings(max_examples=200, derandomize=True, deadline=None, database=None)

# -- request bodies -------------------------------------------------------------------

# What the server's JSON parser (orjson) can hand over: no NaN or infinities,
# and integers within 64 bits (larger ones arrive as floats).
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
other_parts = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio"])}, optional={"image_url": json_values})
contents = st.one_of(st.text(max_size=30), st.lists(st.one_of(text_parts, other_parts), max_size=3))
messages = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLES - {"assistant"})), "content": contents}, optional={"name": st.text(max_size=8)}),
    st.fixed_dictionaries({"role": st.just("assistant")}, optional={"content": st.one_of(contents, st.none()), "tool_calls": json_values}),
)
streaming = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"stream": st.sampled_from([False, None])}),
    st.fixed_dictionaries({"stream": st.just(True)}, optional={"stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})}),
)
OPTIONAL = {
    "max_tokens": st.integers(min_value=1, max_value=4096) | st.none(),
    "max_completion_tokens": st.integers(min_value=1, max_value=4096) | st.none(),
    "temperature": st.floats(min_value=0, max_value=2) | st.none(),
    "top_p": st.floats(min_value=0, max_value=1) | st.none(),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=4) | st.none(),
    "seed": st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1) | st.none(),
    "n": st.sampled_from([1, None]),
    "user": st.text(max_size=10) | st.none(),
    # Not streamvisor's: passed through to providers.
    "tools": json_values,
    "response_format": json_values,
}


@st.composite
def valid_bodies(draw: Any) -> dict[str, Any]:
    body = {"model": draw(st.text(min_size=1, max_size=10)), "messages": draw(st.lists(messages, min_size=1, max_size=3))}
    body.update(draw(streaming))
    body.update(draw(st.fixed_dictionaries({}, optional=OPTIONAL)))
    return body


@st.composite
def spoiled_bodies(draw: Any) -> Any:
    """A valid body with a few fields, or fields of its messages, made anything at all."""
    body = draw(valid_bodies())
    if draw(st.booleans()):
        # Streaming more often: what stream_options may hold is only read then.
        body["stream"] = True
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            body[draw(st.sampled_from(["model", "messages", "stream_options", *OPTIONAL]))] = draw(json_values)
        elif isinstance(body["messages"], list) and body["messages"]:
            message = draw(st.sampled_from(body["messages"]))
            if isinstance(message, dict):
                message[draw(st.sampled_from(["role", "content"]))] = draw(json_values)
    return body


bodies = st.one_of(json_values, valid_bodies(), spoiled_bodies(), spoiled_bodies())


def parse(body: Any) -> ChatRequest | None:
    """`from_openai(body)`, or None when it refused the body with a 400."""
    try:
        return ChatRequest.from_openai(body)
    except InvalidRequest as error:
        assert isinstance(error, APIError) and error.status == 400
        assert error.message
        return None


@PROPERTY
@given(body=bodies)
def test_from_openai_accepts_or_refuses_with_a_400_and_nothing_else(body):
    # Any other exception would leave the server as a 500.
    parse(body)


def test_the_body_strategy_reaches_both_outcomes():
    # A property over bodies that are always refused would say little.
    outcomes = {"accepted": 0, "refused": 0}

    @settings(max_examples=100, derandomize=True, database=None)
    @given(body=st.one_of(valid_bodies(), spoiled_bodies()))
    def count(body):
        outcomes["accepted" if parse(body) is not None else "refused"] += 1

    count()
    assert outcomes["accepted"] >= 10 and outcomes["refused"] >= 10, outcomes


#: The fields `to_openai()` does not carry: how to stream is for the caller to
#: say (the openai provider sets `stream` and `stream_options` itself).
NOT_CARRIED = ("stream", "include_usage")


@PROPERTY
@given(body=st.one_of(valid_bodies(), spoiled_bodies()))
def test_what_from_openai_accepts_survives_the_trip_back_to_a_body(body):
    request = parse(body)
    if request is None:
        return
    # As an upstream receives it: encoded and parsed again.
    again = ChatRequest.from_openai(orjson.loads(orjson.dumps(request.to_openai())))

    def fields(r: ChatRequest) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(r, recurse=False).items() if k not in NOT_CARRIED}

    assert fields(again) == fields(request)


# -- server-sent events -----------------------------------------------------------------

# A data value holds no line break; any other byte may appear.
values = st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
ends = st.sampled_from([b"\n", b"\r\n"])
# Lines that are not data: skipped.
others = st.sampled_from([b": a comment", b":", b"id: 7", b"event: message", b"retry: 10", b"unknown: field"])


@st.composite
def streams(draw: Any) -> tuple[bytes, list[bytes]]:
    """An event stream and the data of its events, as the decoder must give them."""
    out, expected = [], []
    for _ in range(draw(st.integers(0, 6))):
        lines, data = [], []
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.booleans()):
                lines.append(draw(others))
                continue
            value = draw(values)
            # One space after the colon is not part of the value; without it,
            # a value that starts with a space loses that space.
            spaced = draw(st.booleans())
            lines.append(b"data: " + value if spaced else b"data:" + value)
            data.append(value if spaced or not value.startswith(b" ") else value[1:])
        if data:
            expected.append(b"\n".join(data))
        out += [line + draw(ends) for line in lines] + [draw(ends)]
    return b"".join(out), expected


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


cut_lists = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)


@PROPERTY
@given(stream=streams(), cuts=cut_lists)
def test_the_decoder_gives_the_same_events_however_the_stream_is_split(stream, cuts):
    data, expected = stream
    decoder, events = SSEDecoder(), []
    for piece in split(data, cuts):
        events += decoder.feed(piece)
    assert events == expected
    assert not decoder.pending
    assert decoder.close() == []


# Streams that are nearly events: data lines of any length, other lines, stray
# bytes, blank lines, in any order.
def sized(most: int) -> st.SearchStrategy[bytes]:
    """Bytes of any length up to `most`, long ones as likely as short ones."""
    return st.integers(0, most).flatmap(lambda n: st.binary(min_size=n, max_size=n))


rough_streams = st.lists(
    st.one_of(sized(90).map(lambda b: b"data: " + b), others, sized(50), st.just(b"")),
    max_size=12,
).flatmap(lambda lines: st.tuples(*(ends.map(lambda end, line=line: line + end) for line in lines)).map(b"".join))


@PROPERTY
@given(data=st.one_of(st.binary(max_size=400), rough_streams), cuts=cut_lists)
def test_the_decoder_never_holds_more_than_its_bounds(data, cuts):
    # Small bounds, so that they are often passed.
    decoder = SSEDecoder(max_line=32, max_event=64)
    for piece in split(data, cuts):
        try:
            events = decoder.feed(piece)
        except SSEBoundError:
            assert not decoder.pending, "past a bound the decoder lets go of what it held"
            continue
        assert all(len(event) <= 64 for event in events)
        # What it keeps between feeds: the partial line and the event's data so far.
        assert len(decoder._buffer) <= 32
        assert decoder._event_bytes <= 64


@PROPERTY
@given(stream=streams(), cuts=cut_lists)
def test_a_stream_within_the_bounds_never_trips_them(stream, cuts):
    data, expected = stream
    longest_line = max((len(line) for line in data.split(b"\n")), default=0)
    largest_event = max((len(event) + 1 for event in expected), default=0)
    decoder, events = SSEDecoder(max_line=longest_line, max_event=largest_event), []
    for piece in split(data, cuts):
        events += decoder.feed(piece)
    assert events == expected


@pytest.mark.parametrize(
    "stream, bound",
    [
        (b"data: " + b"x" * 40, "longer than 32 bytes"),  # a line without its end
        (b"data: xxxxxxxxxxxxxxx\n" * 5, "larger than 64 bytes"),  # short lines, one endless event
    ],
    ids=["line", "event"],
)
def test_past_a_bound_the_decoder_refuses(stream, bound):
    with pytest.raises(SSEBoundError, match=bound):
        SSEDecoder(max_line=32, max_event=64).feed(stream)


def test_after_a_refused_event_the_next_one_is_read():
    # Found by the property above: the size of the refused event was kept, so
    # every later event was refused too.
    decoder = SSEDecoder(max_line=32, max_event=64)
    with pytest.raises(SSEBoundError):
        decoder.feed(b"data: " + b"x" * 70 + b"\n")
    assert decoder.feed(b"\ndata: small\n\n") == [b"small"]
