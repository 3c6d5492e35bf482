"""Streams longer than quart's 60 s RESPONSE_TIMEOUT are not cut."""

import pytest

from .conftest import start_server

pytestmark = pytest.mark.slow

LONG = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "marathon"
text = "step"
repeat = 33
delay = 2.0
"""


def test_a_stream_of_66_seconds_arrives_whole():
    with start_server(LONG) as server:
        stream = server.openai(timeout=120).chat.completions.create(
            model="marathon", messages=[{"role": "user", "content": "go"}], stream=True
        )
        words = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(words) == 33
