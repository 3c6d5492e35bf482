"""The reasoning plugin: <think>…</think> in content becomes reasoning_content,
with counted reasoning tokens, through a parser made per session."""

from __future__ import annotations

import gc

import pytest

from streamvisor.config import ConfigError
from streamvisor.hooks import PluginHost
from streamvisor.plugins.reasoning import ThinkParser

from .conftest import make_config
from .test_plugin_usage import NOT_TAGS, _server, _usage, _wait_recorded


def _stream_parts(client, model):
    reasoning, content, usage = [], [], None
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "2+2?"}], stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if getattr(choice.delta, "reasoning_content", None):
                reasoning.append(choice.delta.reasoning_content)
            if choice.delta.content:
                content.append(choice.delta.content)
    return reasoning, "".join(content), usage


def _parsers() -> int:
    gc.collect()
    return sum(isinstance(o, ThinkParser) for o in gc.get_objects())


@pytest.mark.parametrize("model, pieces, completion", [("thinker", ["let", " me", " see"], 6), ("split-think", ["let me", " see"], 5)])
def test_think_tags_become_reasoning_content_and_reasoning_tokens(model, pieces, completion):
    with _server() as server:
        client = server.openai()
        reasoning, content, usage = _stream_parts(client, model)
        assert reasoning == pieces  # streamed as several reasoning deltas
        assert content == "The answer is 4."
        assert usage.completion_tokens == completion
        assert usage.completion_tokens_details.reasoning_tokens == 3

        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "2+2?"}])
        message = reply.choices[0].message
        assert message.content == "The answer is 4."
        assert message.reasoning_content == "let me see"
        assert reply.usage.completion_tokens_details.reasoning_tokens == 3

        # The usage plugin records what the reasoning plugin counted.
        _wait_recorded(server, 2)
        body = _usage(server, model=model)
        assert body["totals"]["reasoning_tokens"] == 6
        assert body["totals"]["completion_tokens"] == 2 * completion
        # Each session had a parser of its own, and none outlives its session.
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
        assert server.call(_parsers) == 0


def test_text_that_only_looks_like_a_tag_is_content_unchanged():
    with _server() as server:
        client = server.openai()
        reasoning, content, usage = _stream_parts(client, "not-tags")
        assert reasoning == [] and content == "".join(NOT_TAGS)
        assert usage.completion_tokens_details is None or not usage.completion_tokens_details.reasoning_tokens


def test_custom_tags_and_no_plugin_at_all():
    with _server(reasoning='[plugins.reasoning]\nthink_open = "<t>"\nthink_close = "</t>"\n') as server:
        reply = server.openai().chat.completions.create(model="thinker", messages=[{"role": "user", "content": "?"}])
        assert reply.choices[0].message.content == "<think>let me see</think>The answer is 4."
    with _server(reasoning="") as server:
        reply = server.openai().chat.completions.create(model="thinker", messages=[{"role": "user", "content": "?"}])
        assert reply.choices[0].message.content == "<think>let me see</think>The answer is 4."
        assert reply.usage.completion_tokens_details is None or not reply.usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize("setting", ['think_open = "<x>"\nthink_close = "<x>"', 'think_open = "< x>"', 'think_close = ""'])
def test_bad_tags_stop_start_up(setting):
    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config(f"[plugins.reasoning]\n{setting}\n"))
    assert "plugins.reasoning" in str(caught.value)
