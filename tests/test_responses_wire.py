"""plugins/responses/wire.py: chat deltas as Responses API events and objects.

Every event and response object is checked against the openai package's own
models (the ground truth of the format), and the official client's stream
helper must accumulate the events into the same response.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import orjson
import pydantic
import pytest
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from streamvisor.hooks import Delta, Usage
from streamvisor.plugins.responses.wire import (
    Output,
    ResponseMeta,
    encode,
    error_json,
    messages_of,
    usage_json,
)

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
USAGE = Usage(prompt_tokens=12, completion_tokens=30, reasoning_tokens=7, cached_tokens=4)
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}


def meta(**fields) -> ResponseMeta:
    base = dict(id="resp_0123abcd", created_at=1_700_000_000, model="gemma-3-270m")
    return ResponseMeta(**{**base, **fields})


def call_pieces(index: int, call_id: str, name: str, arguments: list[str]) -> list[Delta]:
    """A tool call as chat deltas: the id and name in the first piece only."""
    first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    rest = [{"index": index, "function": {"arguments": a}} for a in arguments]
    return [Delta(tool_calls=[first])] + [Delta(tool_calls=[p]) for p in rest]


REASONING_THEN_TEXT = (
    [Delta(role="assistant")]
    + [Delta(reasoning=r) for r in ["The user ", "wants ", "a haiku."]]
    + [Delta(content=c) for c in ["Rivers ", "", "run ", "to the ", "sea"]]
    + [Delta(finish_reason="stop")]
)
TEXT_THEN_CALLS = (
    [Delta(role="assistant"), Delta(content="Let me "), Delta(content="check.")]
    + call_pieces(0, "call_a", "get_weather", ['{"ci', 'ty": "Par', 'is"}'])
    + call_pieces(1, "call_b", "get_weather", ['{"city": ', '"Oslo"}'])
    + [Delta(finish_reason="tool_calls")]
)


def run(deltas, batches=None, status="completed", usage=USAGE, start="in_progress", **finish) -> list[dict]:
    out = Output(meta())
    events = out.start(start)
    batches = batches if batches is not None else [deltas]
    for batch in batches:
        events += out.feed(batch)
    events += out.finish(status, usage, **finish)
    return events


def validate(events: list[dict]) -> list:
    """Each event against the openai models, through JSON as a client reads it."""
    parsed = []
    for event in events:
        wire = json.loads(orjson.dumps(event))
        model = EVENT.validate_python(wire)
        assert model.type == event["type"]
        if "response" in event:
            Response.model_validate(wire["response"])
        parsed.append(model)
    return parsed


def accumulate(events: list[dict]):
    """What the official client's stream helper makes of the events: the
    response of the terminal event (for `response.completed`, the one it built
    from the stream)."""
    state = ResponseStreamState(input_tools=[TOOL], text_format=openai.omit)
    last = None
    for model in validate(events):
        for fired in state.handle_event(model):
            last = fired
    return last.response


def split(deltas, rng: random.Random) -> list[list[Delta]]:
    batches, i = [], 0
    while i < len(deltas):
        n = rng.randint(0, 4)
        batches.append(deltas[i : i + n])
        i += n
    return batches


# -- the format ----------------------------------------------------------------------


def test_reasoning_then_content_validates_and_gives_the_text():
    events = run(REASONING_THEN_TEXT)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        *["response.reasoning_summary_text.delta"] * 3,
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,  # the empty string emits nothing
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = accumulate(events)
    assert final.status == "completed"
    assert final.output_text == "Rivers run to the sea"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "The user wants a haiku."
    assert final.output[0].id == "rs_0123abcd_0" and final.output[1].id == "msg_0123abcd_1"
    assert all(item.status == "completed" for item in final.output)
    assert final.usage.output_tokens_details.reasoning_tokens == 7

    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["text"] == "Rivers run to the sea" and text_done["logprobs"] == []
    assert text_done["item_id"] == "msg_0123abcd_1" and text_done["output_index"] == 1
    summary_done = next(e for e in events if e["type"] == "response.reasoning_summary_part.done")
    assert "status" not in summary_done and summary_done["part"]["text"] == "The user wants a haiku."


def test_created_and_in_progress_open_the_stream():
    out = Output(meta(background=True, instructions="Be brief.", metadata={"k": "v"}, tools=(TOOL,)))
    created, in_progress = out.start("queued")
    assert (created["type"], created["sequence_number"], created["response"]["status"]) == (
        "response.created",
        0,
        "queued",
    )
    assert (in_progress["type"], in_progress["sequence_number"], in_progress["response"]["status"]) == (
        "response.in_progress",
        1,
        "in_progress",
    )
    validate([created, in_progress])
    response = Response.model_validate(created["response"])
    assert response.background is True and response.instructions == "Be brief." and response.metadata == {"k": "v"}
    assert response.tools[0].name == "get_weather" and response.output == [] and response.usage is None
    assert "output_text" not in created["response"]
    assert out.sequence == 2


def test_content_then_two_tool_calls_with_arguments_in_pieces():
    events = run(TEXT_THEN_CALLS)
    final = accumulate(events)
    assert final.output_text == "Let me check."
    message, first, second = final.output
    assert message.type == "message"
    assert (first.type, first.id, first.call_id, first.name, first.arguments, first.status) == (
        "function_call",
        "fc_0123abcd_1",
        "call_a",
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )
    assert (second.call_id, second.arguments, second.id) == ("call_b", '{"city": "Oslo"}', "fc_0123abcd_2")
    assert json.loads(first.arguments) == {"city": "Paris"}
    # the official helper parsed the arguments against the tool as it streamed
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert [(e["output_index"], e["delta"]) for e in deltas] == [
        (1, '{"ci'),
        (1, 'ty": "Par'),
        (1, 'is"}'),
        (2, '{"city": '),
        (2, '"Oslo"}'),
    ]
    # each call is closed before the next opens
    kinds = [(e["type"], e.get("output_index")) for e in events]
    assert kinds.index(("response.output_item.done", 1)) < kinds.index(("response.output_item.added", 2))
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"city": "Paris"}', '{"city": "Oslo"}']
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert added[1]["item"] == {
        "id": "fc_0123abcd_1",
        "type": "function_call",
        "status": "in_progress",
        "call_id": "call_a",
        "name": "get_weather",
        "arguments": "",
    }


def test_a_whole_call_in_one_delta_and_calls_that_repeat_index_zero():
    # Some servers send each call whole, all with index 0 (or none): the id tells them apart.
    deltas = [
        Delta(tool_calls=[{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
        Delta(tool_calls=[{"index": 0, "id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]),
        Delta(tool_calls=[{"id": "c3", "type": "function", "function": {"name": "h", "arguments": '{"a":'}}]),
        Delta(tool_calls=[{"function": {"arguments": "1}"}}]),
    ]
    final = accumulate(run(deltas))
    assert [(o.call_id, o.name, o.arguments) for o in final.output] == [
        ("c1", "f", "{}"),
        ("c2", "g", "{}"),
        ("c3", "h", '{"a":1}'),
    ]


def test_a_call_without_an_id_gets_a_deterministic_one_and_a_late_piece_is_ignored():
    deltas = [
        Delta(tool_calls=[{"index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
        Delta(tool_calls=[{"index": 1, "type": "function", "function": {"name": "g", "arguments": "{"}}]),
        Delta(tool_calls=[{"index": 0, "function": {"arguments": "late"}}]),
        Delta(tool_calls=[{"index": 1, "function": {"arguments": "}"}}]),
    ]
    final = accumulate(run(deltas))
    assert [(o.call_id, o.arguments) for o in final.output] == [("call_0123abcd_0", "{}"), ("call_0123abcd_1", "{}")]
    # an id that comes after the first piece continues the call; the call_id announced stays
    late_id = [
        Delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]),
        Delta(tool_calls=[{"index": 0, "id": "call_z", "function": {"arguments": ": 1}"}}]),
    ]
    final = accumulate(run(late_id))
    assert [(o.call_id, o.arguments) for o in final.output] == [("call_0123abcd_0", '{"a": 1}')]


def test_role_only_empty_and_finish_reason_deltas_emit_nothing():
    out = Output(meta())
    out.start()
    assert out.feed([Delta(role="assistant"), Delta(content=""), Delta(reasoning=""), Delta(finish_reason="stop")]) == []
    assert out.feed([Delta(tool_calls=[])]) == []
    events = out.finish("completed", None)
    assert [e["type"] for e in events] == ["response.completed"]
    final = Response.model_validate(events[0]["response"])
    assert final.output == [] and final.output_text == "" and final.usage is None


def test_content_reasoning_content_opens_three_items():
    deltas = [Delta(content="a"), Delta(reasoning="hm"), Delta(content="b"), Delta(reasoning="x", content="c")]
    final = accumulate(run(deltas))
    assert [o.type for o in final.output] == ["message", "reasoning", "message", "reasoning", "message"]
    assert final.output_text == "abc"
    assert [o.id for o in final.output] == [
        "msg_0123abcd_0",
        "rs_0123abcd_1",
        "msg_0123abcd_2",
        "rs_0123abcd_3",
        "msg_0123abcd_4",
    ]


# -- determinism and resume ----------------------------------------------------------


@pytest.mark.parametrize("deltas", [REASONING_THEN_TEXT, TEXT_THEN_CALLS], ids=["reasoning", "calls"])
def test_any_split_into_batches_gives_the_same_events(deltas):
    whole = run(deltas)
    assert run(deltas, batches=[[d] for d in deltas]) == whole
    assert run(deltas, batches=[[], deltas, []]) == whole
    rng = random.Random(16)
    for _ in range(50):
        assert run(deltas, batches=split(deltas, rng)) == whole
    assert [encode(e) for e in run(deltas, batches=split(deltas, rng))] == [encode(e) for e in whole]


def test_sequence_numbers_have_no_gaps_and_a_resume_gives_exactly_the_tail():
    deltas = REASONING_THEN_TEXT + [Delta(content=str(i)) for i in range(30)]
    whole = run(deltas)
    assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
    rng = random.Random(7)
    for n in (-1, 0, 1, 10, len(whole) - 2, len(whole) - 1):
        regenerated = run(deltas, batches=split(deltas, rng))
        tail = [e for e in regenerated if e["sequence_number"] > n]
        assert tail == whole[n + 1 :]
    # a partial regeneration (the session still running) is a prefix of the whole
    out = Output(meta())
    events = out.start() + out.feed(deltas[:9])
    assert events == whole[: len(events)] and out.sequence == len(events)


# -- how a response ends -------------------------------------------------------------


def test_incomplete_closes_the_open_item_as_incomplete():
    events = run(REASONING_THEN_TEXT, status="incomplete", incomplete_reason="max_output_tokens")
    assert events[-1]["type"] == "response.incomplete"
    final = accumulate(events)
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == "Rivers run to the sea"
    assert [o.status for o in final.output] == ["completed", "incomplete"]
    item_done = [e for e in events if e["type"] == "response.output_item.done"]
    assert item_done[-1]["item"]["status"] == "incomplete"


def test_a_reasoning_part_cut_short_says_incomplete():
    events = run([Delta(reasoning="thinking")], status="incomplete", incomplete_reason="max_output_tokens")
    part_done = next(e for e in events if e["type"] == "response.reasoning_summary_part.done")
    assert part_done["status"] == "incomplete"
    validate(events)


def test_failed_carries_the_error():
    events = run(
        TEXT_THEN_CALLS[:4],
        status="failed",
        usage=Usage(prompt_tokens=5, completion_tokens=2, exact=False),
        error={"code": "server_error", "message": "The upstream closed the connection."},
    )
    terminal = events[-1]
    assert terminal["type"] == "response.failed"
    final = accumulate(events)
    assert final.status == "failed"
    assert (final.error.code, final.error.message) == ("server_error", "The upstream closed the connection.")
    assert final.output_text == "Let me check."
    assert final.output[-1].type == "function_call" and final.output[-1].status == "incomplete"
    assert final.usage.input_tokens == 5


def test_an_error_code_the_responses_api_lacks_is_mapped():
    assert error_json({"code": "upstream_timeout", "message": "slow"}) == {
        "code": "server_error",
        "message": "slow",
        "type": "upstream_timeout",
    }
    assert error_json({"code": "rate_limited", "message": "m", "type": "rate_limit_error"}) == {
        "code": "rate_limit_exceeded",
        "message": "m",
        "type": "rate_limit_error",
    }
    events = run([Delta(content="x")], status="failed", error={"code": "upstream_error", "message": "boom"})
    validate(events)
    assert events[-1]["response"]["error"]["code"] == "server_error"
    # a failure without an error still says one
    bare = run([], status="failed")
    validate(bare)
    assert bare[-1]["response"]["error"]["code"] == "server_error"


def test_cancelled_ends_with_response_failed_and_status_cancelled():
    events = run(REASONING_THEN_TEXT[:6], status="cancelled", start="queued")
    terminal = events[-1]
    assert terminal["type"] == "response.failed"
    assert terminal["response"]["status"] == "cancelled" and terminal["response"]["error"] is None
    final = accumulate(events)
    assert final.status == "cancelled"
    assert [o.status for o in final.output] == ["completed", "incomplete"]
    assert final.output_text == "Rivers "


def test_misuse_is_an_error():
    out = Output(meta())
    with pytest.raises(RuntimeError):
        out.feed([Delta(content="x")])
    out.start()
    with pytest.raises(RuntimeError):
        out.start()
    with pytest.raises(ValueError):
        out.finish("done", None)
    out.finish("completed", None)
    with pytest.raises(RuntimeError):
        out.feed([Delta(content="x")])
    with pytest.raises(RuntimeError):
        out.finish("completed", None)


# -- the response object -------------------------------------------------------------


def test_the_response_object_while_running_and_after():
    out = Output(meta(temperature=0.2, top_p=0.9, max_output_tokens=64, previous_response_id="resp_prev", user="u"))
    out.start()
    out.feed(REASONING_THEN_TEXT[:7])
    running = out.response("in_progress")
    model = Response.model_validate(running)
    assert model.status == "in_progress" and model.output_text == "Rivers run "
    assert [o.status for o in model.output] == ["completed", "in_progress"]
    assert (model.temperature, model.top_p, model.max_output_tokens) == (0.2, 0.9, 64)
    assert model.previous_response_id == "resp_prev" and model.user == "u"
    assert running["store"] is True and "output_text" not in running
    assert out.text == "Rivers run "
    out.feed(REASONING_THEN_TEXT[7:])
    events = out.finish("completed", USAGE)
    assert events[-1]["response"] == out.response("completed", USAGE)
    done = Response.model_validate(out.response("completed", USAGE))
    assert done.output_text == out.text == "Rivers run to the sea"
    assert out.items == out.response("completed")["output"]


def test_usage_json_uses_the_responses_names():
    assert usage_json(None) is None
    body = usage_json(USAGE)
    assert body == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 7},
        "total_tokens": 42,
    }
    Response.model_validate({**Output(meta()).response("completed"), "usage": body})


def test_the_error_event():
    out = Output(meta())
    events = out.start()
    events += out.error("The session was deleted.", code="not_found")
    assert events[-1] == {
        "type": "error",
        "sequence_number": 2,
        "code": "not_found",
        "message": "The session was deleted.",
        "param": None,
    }
    validate(events)


# -- the wire --------------------------------------------------------------------------


def test_encode_is_one_server_sent_event():
    event = {"type": "response.output_text.delta", "sequence_number": 3, "delta": "é\n"}
    assert encode(event) == b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":3,"delta":"\xc3\xa9\\n"}\n\n'


def test_the_official_client_reads_the_encoded_stream():
    events = run(TEXT_THEN_CALLS[:3] + REASONING_THEN_TEXT)
    body = b"".join(encode(e) for e in events)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = openai.OpenAI(
        base_url="http://test/v1", api_key="unused", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    streamed = list(client.responses.create(model="gemma-3-270m", input="hi", stream=True))
    assert [e.sequence_number for e in streamed] == list(range(len(events)))
    with client.responses.stream(model="gemma-3-270m", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Let me check.Rivers run to the sea"
    assert final.id == "resp_0123abcd"


# -- continuing a conversation -----------------------------------------------------------


def test_messages_of_round_trip():
    final = accumulate(run(REASONING_THEN_TEXT + TEXT_THEN_CALLS))
    items = [o.model_dump(exclude_none=True) for o in final.output]
    # reasoning, then one message (consecutive text is one item), then two calls: the calls join it
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call", "function_call"]
    assert messages_of(items) == [
        {
            "role": "assistant",
            "content": "Rivers run to the seaLet me check.",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            ],
        }
    ]


def test_messages_of_calls_without_text_and_text_after_calls():
    deltas = (
        [Delta(reasoning="plan")]
        + call_pieces(0, "call_x", "f", ["{}"])
        + [Delta(reasoning="more")]
        + call_pieces(1, "call_y", "g", ['{"n": 1}'])
        + [Delta(content="done")]
    )
    out = Output(meta())
    out.start()
    out.feed(deltas)
    out.finish("completed", None)
    assert messages_of(out.items) == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "call_y", "type": "function", "function": {"name": "g", "arguments": '{"n": 1}'}},
            ],
        },
        {"role": "assistant", "content": "done"},
    ]
    assert messages_of([]) == []


def test_feed_bytes_is_byte_for_byte_what_feed_and_encode_give():
    import random as _random

    from streamvisor.plugins.responses import wire as _wire

    rng = _random.Random(12)
    kinds = [
        lambda i: Delta(content=f" w{i}\u00e9\"q"),
        lambda i: Delta(reasoning=f" r{i}"),
        lambda i: Delta(tool_calls=[{"index": i % 2, "id": f"call_{i % 2}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
        lambda i: Delta(role="assistant"),
        lambda i: Delta(content=""),
    ]
    for trial in range(20):
        deltas = [rng.choice(kinds[:1] * 6 + kinds[1:])(i) for i in range(60)]
        meta = _wire.ResponseMeta(id=f"resp_{trial:024x}", created_at=1, model="m")
        slow, fast = _wire.Output(meta), _wire.Output(meta)
        assert slow.start() == fast.start()
        cut = rng.randrange(1, 59)
        expected = b"".join(_wire.encode(e) for e in slow.feed(deltas[:cut])) + b"".join(_wire.encode(e) for e in slow.feed(deltas[cut:]))
        got = fast.feed_bytes(deltas[:cut]) + fast.feed_bytes(deltas[cut:])
        assert got == expected
        assert slow.finish("completed", None) == fast.finish("completed", None)
