"""The OpenAI-compatible surface, driven by the official openai client."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from .conftest import start_server


def test_lists_models(scripted_server):
    client = scripted_server.openai()
    ids = {m.id for m in client.models.list()}
    assert {"fox", "slow", "echo", "broken"} <= ids


def test_non_streaming_completion_has_content_and_usage(scripted_server):
    client = scripted_server.openai()
    reply = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "tell me"}])
    assert reply.choices[0].message.content == "The quick brown fox jumps over the lazy dog."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == 9
    assert reply.usage.total_tokens == 11


def test_streaming_completion_arrives_in_chunks_with_usage_last(scripted_server):
    client = scripted_server.openai()
    stream = client.chat.completions.create(
        model="fox",
        messages=[{"role": "user", "content": "tell me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 9
    assert "".join(texts) == "The quick brown fox jumps over the lazy dog."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_sends_no_usage_chunk(scripted_server):
    with scripted_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json={"model": "fox", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["choices"] for p in payloads)
    assert all("usage" not in p for p in payloads)


def test_every_sse_event_has_an_id(scripted_server):
    with scripted_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json={"model": "fox", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as response:
            body = response.read().decode()
    events = [e for e in body.split("\n\n") if e and e != "data: [DONE]"]
    assert [e.splitlines()[0] for e in events] == [f"id: {i}" for i in range(len(events))]


def test_echo_passes_the_user_message_through(scripted_server):
    client = scripted_server.openai()
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo wörld"}]
    )
    assert reply.choices[0].message.content == "héllo wörld"


def test_max_tokens_ends_with_length(scripted_server):
    client = scripted_server.openai()
    reply = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert reply.choices[0].message.content == "The quick brown"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


# -- headers -------------------------------------------------------------------


def test_request_id_is_echoed_when_sane_and_made_otherwise(scripted_server):
    with scripted_server.http() as http:
        given = http.get("/v1/models", headers={"X-Request-ID": "client-req-42"})
        assert given.headers["X-Request-ID"] == "client-req-42"
        insane = http.get("/v1/models", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 300})
        assert insane.headers["X-Request-ID"] != "bad id\twith spaces" + "x" * 300
        assert len(insane.headers["X-Request-ID"]) == 32
        made = http.get("/v1/models")
        assert len(made.headers["X-Request-ID"]) == 32
        assert made.headers["X-Request-ID"] != insane.headers["X-Request-ID"]


def test_every_response_has_server_timing(scripted_server):
    with scripted_server.http() as http:
        for response in (
            http.get("/v1/models"),
            http.get("/nowhere"),
            http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}]}),
        ):
            assert response.headers["Server-Timing"].startswith("total;dur=")


def test_completion_response_names_its_session(scripted_server):
    client = scripted_server.openai()
    raw = client.chat.completions.with_raw_response.create(model="fox", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["X-Session-ID"].startswith("sess_")
    assert raw.headers["X-Request-ID"]



@pytest.mark.parametrize("stream", [True, False])
def test_a_served_finished_session_keeps_its_metadata_but_not_its_chunks(scripted_server, stream):
    """Retained sessions stay inspectable, but their buffers are dropped once the
    response is sent: thousands of retained buffers made every full garbage
    collection walk each of their chunks."""
    client = scripted_server.openai()
    raw = client.chat.completions.with_raw_response.create(model="fox", messages=[{"role": "user", "content": "x"}], stream=stream)
    text = "".join((c.choices[0].delta.content or "") for c in raw.parse() if c.choices) if stream else raw.parse().choices[0].message.content
    assert text.startswith("The quick brown fox")
    session_id = raw.headers["X-Session-ID"]
    scripted_server.wait_for(lambda: scripted_server.runtime.sessions.get(session_id).chunks == [])
    inspected = scripted_server.http().get(f"/v1/sessions/{session_id}").json()
    assert inspected["state"] == "completed" and inspected["chunks"] == len(text.split()) + 1  # the words, then finish_reason

# -- errors ----------------------------------------------------------------------


def _assert_envelope(response, status, *, code=None, param=None, request_id=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "request_id", "timestamp"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    assert body["request_id"] == response.headers["X-Request-ID"]
    if request_id is not None:
        assert body["request_id"] == request_id
    assert isinstance(body["timestamp"], int)
    return body


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "fox"}, "messages"),
        ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "fox", "messages": "hello"}, "messages"),
        ({"model": "fox", "messages": []}, "messages"),
        ({"model": "fox", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "fox", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"model": "fox", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "fox", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"model": "fox", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "fox", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_fields_get_400_naming_the_param(scripted_server, body, param):
    with scripted_server.http() as http:
        _assert_envelope(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_malformed_json_gets_400(scripted_server):
    with scripted_server.http() as http:
        response = http.post("/v1/chat/completions", content=b'{"model": "fox", ', headers={"X-Request-ID": "bad-json-1"})
        body = _assert_envelope(response, 400, request_id="bad-json-1")
        assert "JSON" in body["error"]["message"]
        _assert_envelope(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
        _assert_envelope(http.post("/v1/chat/completions", content=b""), 400)


def test_unknown_model_gets_404_listing_models(scripted_server):
    client = scripted_server.openai()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert "gpt-17" in caught.value.message and "fox" in caught.value.message
    with scripted_server.http() as http:
        _assert_envelope(
            http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}),
            404,
            code="model_not_found",
            param="model",
        )


def test_unknown_route_and_wrong_method(scripted_server):
    with scripted_server.http() as http:
        _assert_envelope(http.get("/v2/nothing"), 404, code="not_found")
        _assert_envelope(http.get("/v1/chat/completions"), 405, code="method_not_allowed")
        _assert_envelope(http.delete("/v1/models"), 405, code="method_not_allowed")


def test_body_over_the_limit_gets_413():
    with start_server(SCRIPTED_SMALL, max_body_bytes=1000) as server, server.http() as http:
        big = {"model": "fox", "messages": [{"role": "user", "content": "x" * 5000}]}
        _assert_envelope(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")
        ok = {"model": "fox", "messages": [{"role": "user", "content": "x" * 100}]}
        assert http.post("/v1/chat/completions", json=ok).status_code == 200


SCRIPTED_SMALL = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
"""


def test_upstream_failure_before_first_chunk_is_502(scripted_server):
    client = scripted_server.openai()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}], stream=True)
    assert caught.value.status_code == 502
    with scripted_server.http() as http:
        body = _assert_envelope(
            http.post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]}),
            502,
        )
        assert body["error"]["type"] == "upstream_error"


def test_failure_after_first_chunk_ends_the_stream_with_an_error_event(scripted_server):
    client = scripted_server.openai()
    stream = client.chat.completions.create(
        model="breaks-midway", messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
    assert "".join(seen) == "one two three"
    assert "scripted failure" in str(caught.value)


class ExplodingProvider:
    name = "exploding"

    async def list_models(self):
        from streamvisor.core.providers import ModelInfo

        return [ModelInfo("boom")]

    async def stream(self, request):
        raise RuntimeError("secret internal detail /etc/passwd")
        yield  # pragma: no cover


class ExplodingPlugin:
    from streamvisor.hooks import hookimpl

    @hookimpl
    def register_providers(self, register):
        register(ExplodingProvider())

    @hookimpl
    def register_routes(self, register):
        async def crash():
            raise ZeroDivisionError("internal state that must not leak")

        register("/crash", crash)


def test_unexpected_exceptions_are_500_without_details_and_logged_with_the_request_id(caplog):
    with start_server("[plugins.exploding]", plugins={"exploding": ExplodingPlugin}) as server, server.http() as http:
        with caplog.at_level(logging.ERROR):
            response = http.get("/crash", headers={"X-Request-ID": "crash-7"})
            body = _assert_envelope(response, 500, code="internal_error", request_id="crash-7")
            assert "internal state" not in response.text
            failed = http.post(
                "/v1/chat/completions",
                json={"model": "boom", "messages": [{"role": "user", "content": "x"}]},
                headers={"X-Request-ID": "boom-8"},
            )
            _assert_envelope(failed, 500, request_id="boom-8")
            assert "passwd" not in failed.text
    assert body["error"]["type"] == "server_error"
    logged = {(r.request_id, r.levelno) for r in caplog.records}
    assert ("crash-7", logging.ERROR) in logged
    assert ("boom-8", logging.ERROR) in logged
