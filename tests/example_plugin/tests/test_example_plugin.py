"""The example plugin against a real server, written as its author would: with
the fixtures of streamvisor.testing and the official openai client."""

import openai
import pytest


def test_its_model_is_listed(openai_client):
    models = {m.id: m for m in openai_client.models.list()}
    assert models["example-reverse"].owned_by == "example"


def test_streams_the_last_user_message_reversed_word_by_word_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="example-reverse",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "stream me backwards"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["Howdy", " sdrawkcab", " em", " maerts"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 4, 13)


def test_max_tokens_cuts_the_reply_with_length(openai_client):
    reply = openai_client.chat.completions.create(model="example-reverse", messages=[{"role": "user", "content": "one two three"}], max_tokens=2)
    assert reply.choices[0].message.content == "Howdy eerht"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2


def test_a_request_without_a_user_message_gets_its_400(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="example-reverse", messages=[{"role": "system", "content": "nobody asks"}])
    assert "needs a user message" in caught.value.message
    assert caught.value.body["param"] == "messages"


def test_its_route_answers_with_the_configured_greeting(streamvisor_server):
    response = streamvisor_server.http().get("/example/hello")
    assert response.status_code == 200, response.text
    assert response.json() == {"plugin": "example", "greeting": "Howdy"}
    assert response.headers["X-Request-ID"]  # plugin routes get the core's headers too


def test_its_status_panel_counts_the_replies(streamvisor_server, openai_client, streamvisor_events):
    for _ in range(2):
        openai_client.chat.completions.create(model="example-reverse", messages=[{"role": "user", "content": "hi"}])
    streamvisor_events.wait_for_type("completed", count=2)
    panels = streamvisor_server.run(streamvisor_server.runtime.status_panels)
    assert panels["example"]["replies"] == {"replies": 2}
