"""The Responses API (`/v1/responses`, the `responses` plugin) with the official
`openai` client, unmodified: streamed and not, background with polling and
resume, cancel, delete, conversations, function calls, and a response being a
session like any other."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .conftest import require_local_model, start_server
from .test_store import MODELS

RESPONSES = """
[plugins.responses]
[plugins.usage]
[[plugins.scripted.models]]
name = "echo"
echo = true

[[plugins.scripted.models]]
name = "weather"
text = "unused"
tool_call = "get_weather"
tool_arguments = '{"city": "Paris", "unit": "celsius"}'

[[plugins.scripted.models]]
name = "thinker"
reasoning = "Let me think about foxes."
text = "Foxes are quick."
"""


def store_toml(url: str) -> str:
    return f'\n[plugins.store]\nurl = "{url}"\n'


@pytest.fixture
def server(tmp_path):
    with start_server(MODELS + RESPONSES + store_toml(f"sqlite:///{tmp_path}/store.db"), session_retention_seconds=30) as server:
        yield server


@pytest.fixture
def client(server):
    # Closed at the end: an idle keep-alive connection holds the server's
    # shutdown for its whole grace period.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


FOX = "The quick brown fox jumps over the lazy dog."
COUNT = "w00 w01 w02 w03 w04 w05 w06 w07 w08 w09 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25 w26 w27 w28 w29"


def text_of(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def broken_at(client: openai.OpenAI, sequence: int, **create) -> list:
    """A background response streamed, and the stream dropped after the event
    with this sequence number: the events received."""
    first = []
    stream = client.responses.create(stream=True, background=True, **create)
    for event in stream:
        first.append(event)
        if event.sequence_number == sequence:
            break
    stream.close()
    return first


def test_create_not_streamed_and_streamed_with_the_official_client(server, client):
    response = client.responses.create(model="fox", input="Say something", instructions="Be brief.", max_output_tokens=100, metadata={"k": "v"})
    assert response.status == "completed" and response.output_text == FOX
    assert [item.status for item in response.output] == ["completed"]
    assert response.id.startswith("resp_") and response.model == "fox" and response.metadata == {"k": "v"}
    assert response.usage.output_tokens == 9 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens

    events = list(client.responses.create(model="fox", input=[{"role": "user", "content": "Say something"}], stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == FOX
    final = events[-1].response
    assert final.output_text == FOX and final.usage.output_tokens == 9
    # The same response, read back.
    again = client.responses.retrieve(final.id)
    assert again.status == "completed" and again.output_text == FOX


def test_a_response_is_a_session(server, client):
    response = client.responses.create(model="fox", input="hi")
    session = httpx.get(f"{server.url}/v1/sessions/sess_{response.id.removeprefix('resp_')}").json()
    assert session["state"] == "completed" and session["model"] == "fox" and session["usage"]["completion_tokens"] == 9


def test_max_output_tokens_makes_it_incomplete_and_reasoning_is_a_reasoning_item(server, client):
    cut = client.responses.create(model="count", input="count", max_output_tokens=5)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text == "w00 w01 w02 w03 w04"
    # A finished response's items are closed: none is left "in_progress".
    assert [item.status for item in cut.output] == ["incomplete"]
    assert [item.status for item in client.responses.retrieve(cut.id).output] == ["incomplete"]
    thought = client.responses.create(model="thinker", input="foxes?")
    kinds = [item.type for item in thought.output]
    assert kinds == ["reasoning", "message"] and thought.output_text == "Foxes are quick."
    assert "".join(part.text for part in thought.output[0].summary) == "Let me think about foxes."
    assert thought.usage.output_tokens_details.reasoning_tokens == 5


def test_background_returns_at_once_then_polls_to_completion(server, client):
    started = client.responses.create(model="count", input="count", background=True)
    assert started.status in ("queued", "in_progress") and started.background is True
    deadline = time.monotonic() + 10
    while True:
        polled = client.responses.retrieve(started.id)
        if polled.status == "completed":
            break
        assert polled.status in ("queued", "in_progress") and time.monotonic() < deadline
        time.sleep(0.1)
    assert polled.output_text == COUNT and polled.usage.output_tokens == 30


def test_a_stream_broken_at_sequence_10_resumes_after_it_without_gap_or_duplicate(server, client):
    whole = list(client.responses.create(model="count", input="count", stream=True))
    text = text_of(whole)
    assert text == COUNT
    # The same in the background, broken at 10, then resumed.
    first = broken_at(client, 10, model="count", input="count")
    response_id = first[0].response.id
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=10))
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))
    assert text_of(first + rest) == text
    assert [e.type for e in first + rest] == [e.type for e in whole]
    assert rest[-1].type == "response.completed"


def test_a_background_response_whose_client_left_at_the_first_event_runs_to_the_end(server, client):
    with httpx.stream(
        "POST", f"{server.url}/v1/responses", json={"model": "count", "input": "count", "stream": True, "background": True}, timeout=10
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                response_id = json.loads(line[6:])["response"]["id"]
                break
    deadline = time.monotonic() + 10
    while client.responses.retrieve(response_id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.responses.retrieve(response_id).output_text == COUNT


def test_cancel_is_idempotent_and_delete_forgets(server, client):
    started = client.responses.create(model="slow", input="go", background=True)
    time.sleep(0.2)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.output_text.startswith("tick")
    assert client.responses.cancel(started.id).status == "cancelled"
    client.responses.delete(started.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(started.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 24)


def test_previous_response_id_carries_the_conversation(server, client):
    first = client.responses.create(model="echo", input="My name is Ada.")
    assert first.output_text == "My name is Ada."
    second = client.responses.create(model="echo", input="What is my name?", previous_response_id=first.id)
    # The session behind the second response saw the whole conversation.
    session_id = "sess_" + second.id.removeprefix("resp_")
    messages = server.runtime.sessions.find(session_id).request.messages
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "My name is Ada."), ("assistant", "My name is Ada."), ("user", "What is my name?")
    ]
    # A response that was not stored cannot be continued.
    unstored = client.responses.create(model="echo", input="secret", store=False)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="echo", input="again", previous_response_id=unstored.id)
    assert caught.value.code == "previous_response_not_found"


def test_a_function_call_round_trip(server, client):
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}]
    asked = client.responses.create(model="weather", input="Weather in Paris?", tools=tools)
    calls = [item for item in asked.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    answered = client.responses.create(
        model="weather",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C and sunny"}],
        tools=tools,
    )
    assert answered.output_text == "The tool said: 18 C and sunny"


def test_bad_requests_are_clear_400s(server, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="fox", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}])
    assert "only text parts" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="fox", input="x", background=True, store=False)
    assert "stored" in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="x")
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "fox", "input": "x", "frequency_penalty": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frequency_penalty"


@pytest.mark.local_model
def test_the_embedded_model_answers_through_the_responses_api(tmp_path):
    require_local_model()
    with start_server('[plugins.local]\nmodel = "gemma-3-270m"\nmax_tokens = 24\n[plugins.responses]\n') as server, openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0
    ) as client:
        response = client.responses.create(model="gemma-3-270m", input="Name a colour.", max_output_tokens=8, temperature=0)
        assert response.status in ("completed", "incomplete") and response.output_text.strip()
        assert response.usage.output_tokens > 0
        events = list(client.responses.create(model="gemma-3-270m", input="Name a colour.", max_output_tokens=8, temperature=0, stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
        tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="gemma-3-270m", input="hi", tools=tools)
        assert "does not take function tools" in str(caught.value)


def test_the_openai_agents_sdk_runs_an_agent_turn_with_a_tool_against_the_scripted_provider(server):
    """A real client of the Responses API: the Agents SDK calls the model, runs
    the tool the model asked for, sends its output back, and gets the answer."""
    import agents  # openai-agents, in the test extras
    agents.set_tracing_disabled(True)  # no trace export to OpenAI's servers
    calls = []

    @agents.function_tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city."""
        calls.append((city, unit))
        return f"18 {unit} and sunny in {city}"

    # Connection: close: the SDK's event loop is gone before the client could
    # close a keep-alive connection, which would hold the server's shutdown.
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, default_headers={"Connection": "close"})
    agent = agents.Agent(
        name="forecaster",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="weather", openai_client=client),
    )
    result = agents.Runner.run_sync(agent, "Weather in Paris?")
    assert calls == [("Paris", "celsius")]
    assert result.final_output == "The tool said: 18 celsius and sunny in Paris"


def test_keys_and_limits_hold_for_responses_as_for_chat(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", "responses-admin")
    toml = MODELS + RESPONSES + "\n[plugins.keys]\n" + store_toml(f"sqlite:///{tmp_path}/store.db")
    with start_server(toml) as server:
        r = httpx.post(f"{server.url}/admin/keys", headers={"Authorization": "Bearer responses-admin"}, json={"name": "one", "identity": "one", "rpm_limit": 1})
        secret = r.json()["secret"]
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-sv-not-a-key", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                stranger.responses.create(model="fox", input="hi")
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0) as keyed:
            first = keyed.responses.create(model="fox", input="hi")
            assert first.output_text == FOX
            with pytest.raises(openai.RateLimitError):
                keyed.responses.create(model="fox", input="again")
            # The session behind it is the key's.
            assert httpx.get(f"{server.url}/v1/sessions/sess_{first.id.removeprefix('resp_')}", headers={"Authorization": f"Bearer {secret}"}).json()["key_id"]
