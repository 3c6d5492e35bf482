"""The SSE decoder that reads upstream streams, fed the way a socket delivers bytes."""

import random

import pytest

from streamvisor.core.sse import SSEDecoder

STREAM = (
    b": a comment\n"
    b"id: 1\n"
    b'data: {"a": 1}\n\n'
    b"event: message\r\n"
    b'data: {"b":\r\n'
    b"data: 2}\r\n\r\n"
    b"data:no-space\n\n"
    b"retry: 5\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [b'{"a": 1}', b'{"b":\n2}', b"no-space", b"[DONE]"]


def test_whole_stream():
    assert SSEDecoder().feed(STREAM) == EVENTS


@pytest.mark.parametrize("seed", range(20))
def test_any_split_gives_the_same_events(seed):
    rng = random.Random(seed)
    decoder, events, at = SSEDecoder(), [], 0
    while at < len(STREAM):
        step = rng.randint(1, 7)
        events += decoder.feed(STREAM[at : at + step])
        at += step
    assert events == EVENTS


def test_an_unterminated_last_event_is_kept_on_close():
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: {"last"') == [b'{"a": 1}']
    assert decoder.close() == [b'{"last"']
    assert SSEDecoder().close() == []


def test_a_line_without_end_is_bounded():
    decoder = SSEDecoder(max_line=100)
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        decoder.feed(b"data: " + b"x" * 200)
