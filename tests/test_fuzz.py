"""Fuzzing the HTTP API against a real server with the built-in plugins.

schemathesis reads the served /openapi.json and generates requests for every
operation, both ones the document allows and ones it does not; hypothesis adds
query strings of number-like text in any script, which no schema generates. No
answer may be a 5xx, every 4xx must be the error envelope, and every answer must
be what the document says. Examples are few and seeded (derandomized), so a run
is short and the same each time. The regression tests at the end are what the
fuzzing found.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any, Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from streamvisor.hooks import ADMIN_KEY_ENV

from .conftest import ServerThread, start_server

ADMIN_KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Only quick, healthy models: "slow" streams for minutes and "broken" answers
# 502 on purpose, which would drown what the fuzzer is after.
MODELS = ("fox", "echo")
TOML = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "echo"
echo = true

[plugins.usage]
[plugins.monitor]
[plugins.health]
[plugins.admin]
[plugins.cache]
[plugins.retry]
[plugins.reasoning]
"""

#: What each answer is checked against besides the two rules: the document.
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]

FUZZ = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # failures are collected, not raised: nothing to shrink
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    store = tmp_path_factory.mktemp("fuzz-store") / "store.db"
    files = tmp_path_factory.mktemp("fuzz-files")
    with start_server(TOML + f'[plugins.files]\nfolder = "{files}"\n[plugins.store]\nurl = "sqlite:///{store}"\n', log_level="warning") as server:
        yield server


@pytest.fixture
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The admin plugin reads the key per request: set in this process, the
    # server thread sees it.
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)


def problem(status: int, body: bytes, content_type: str) -> str | None:
    """What is wrong with a response, or None."""
    if status >= 500:
        return f"answered {status}: {body[:300]!r}"
    if status >= 400:
        try:
            envelope = json.loads(body) if content_type.startswith("application/json") else None
            error = envelope["error"]
            if all(isinstance(error[k], str) for k in ("message", "type")) and "code" in error and "request_id" in envelope:
                return None
        except (ValueError, TypeError, KeyError):
            pass
        return f"answered {status} without the error envelope: {body[:300]!r}"
    return None


def with_known_names(strategy: Any, session_ids: list[str], file_ids: list[str]) -> Any:
    """Cases of which a share asks for a served model, a session or a file that
    exists, so that whole sessions run (cache, retry, reasoning, monitor, usage)
    on fuzzed parameters, and session and file routes answer more than 404."""

    def known(pair: tuple[Any, str | None, str | None, str | None]) -> Any:
        case, model, session_id, file_id = pair
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        if session_id is not None and "session_id" in (case.path_parameters or {}):
            case.path_parameters["session_id"] = session_id
        if file_id is not None and "file_id" in (case.path_parameters or {}):
            case.path_parameters["file_id"] = file_id
        return case

    choices = st.sampled_from([None, *MODELS, *MODELS]), st.sampled_from([None, *session_ids]), st.sampled_from([None, *file_ids])
    return st.tuples(strategy, *choices).map(known)


def test_no_operation_answers_5xx_and_every_4xx_is_the_envelope(server, admin_key, request):
    """Also: every answer is what the document says (status, content type,
    schema), so the document is checked against the server, not only read."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    document = server.http().get("/openapi.json").json()
    operations = [result.ok() for result in schema.get_all_operations()]
    # All but GET /openapi.json, which schemathesis leaves out as the document's own
    # (it takes no input anyway; tests/test_openapi.py reads it).
    assert sorted(op.label for op in operations) == sorted(
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item if path != "/openapi.json"
    ), "schemathesis read every operation of the document"

    http = server.http()
    def new_sessions(count: int) -> list[str]:
        return [
            http.post("/v1/chat/completions", json={"model": MODELS[i % len(MODELS)], "messages": [{"role": "user", "content": "hello there"}]}).headers["X-Session-ID"]
            for i in range(count)
        ]

    def new_files(count: int) -> list[str]:
        # As the fuzzer asks: with the admin key, whose files are its own.
        return [http.post("/v1/files", files={"purpose": (None, "user_data"), "file": ("notes.md", b"# notes\n")}, headers=AUTH).json()["id"] for _ in range(count)]

    session_ids, file_ids = new_sessions(len(MODELS)), new_files(2)
    # DELETE gets sessions and files of its own: the other routes' must stay.
    deletable, deletable_files = new_sessions(2 * FUZZ.max_examples), new_files(2 * FUZZ.max_examples)
    session = requests.Session()
    request.addfinalizer(session.close)  # an idle keep-alive connection would hold the server's shutdown
    problems: list[str] = []
    statuses: dict[str, set[int]] = {}

    for operation in operations:
        definition = document["paths"][operation.path][operation.method.lower()]
        # Negative cases need something to spoil that can still be sent: a query,
        # a body or the admin key. (A path parameter made invalid holds a "/",
        # which makes another path: schemathesis gives up on it after a while.)
        negatable = "requestBody" in definition or "security" in definition or any(
            p["in"] == "query" for p in definition.get("parameters", ())
        )
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,):

            @FUZZ
            @given(
                case=with_known_names(
                    operation.as_strategy(generation_mode=mode),
                    deletable if operation.method.upper() == "DELETE" else session_ids,
                    deletable_files if operation.method.upper() == "DELETE" else file_ids,
                )
            )
            def send(case: Any) -> None:
                response = case.call(base_url=server.url, session=session, headers=AUTH, timeout=30)
                statuses.setdefault(operation.label, set()).add(response.status_code)
                # schemathesis's response: header names lower-cased, each with its values.
                found = problem(response.status_code, response.content, response.headers.get("content-type", [""])[0])
                if found is None:
                    try:
                        case.validate_response(response, checks=CONFORMANCE, headers=AUTH)
                    except* AssertionError as failures:  # schemathesis raises a group of them
                        found = f"answered {response.status_code}, not as documented: {str(failures.exceptions[0]).strip()[:600]}"
                if found:
                    problems.append(f"{operation.label} {found}\n  {case.as_curl_command(headers=AUTH, base_url=server.url)}")

            send()

    assert problems == []
    # The fuzzer got past the key, to the providers and to real sessions, not
    # just to 401 and 404.
    reached = [label for label, seen in statuses.items() if 200 in seen]
    assert sorted(reached) == sorted(op.label for op in operations), f"never answered 200: {set(statuses) - set(reached)}"


#: Numbers as text in any script: digits of every kind (superscripts, circled,
#: Arabic-Indic, ...) alone, or with signs, points and exponents among them.
NUMBER_LIKE = st.one_of(
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),
    st.text(st.one_of(st.characters(categories=["Nd", "Nl", "No"]), st.sampled_from("+-.eE_ 0123456789")), max_size=8),
)


def test_query_strings_in_any_script_are_refused_with_the_envelope(server, admin_key):
    """A query parameter is text whatever the document says it holds: each query
    parameter of each GET operation gets number-like text if it holds a number,
    any text if not, which schemathesis does not generate."""
    document = server.http().get("/openapi.json").json()
    targets = [
        (path, parameter["name"], parameter["schema"].get("type") in ("integer", "number"))
        for path, item in document["paths"].items()
        if "get" in item
        for parameter in item["get"].get("parameters", ())
        if parameter["in"] == "query"
    ]
    assert len(targets) >= 11, "the usage routes' filters and limit, at least"
    http = httpx.Client(base_url=server.url, headers=AUTH, timeout=30)
    problems: list[str] = []

    for path, name, numeric in targets:

        @FUZZ
        @given(value=NUMBER_LIKE if numeric else st.text(max_size=12))
        def send(value: str) -> None:
            response = http.get(path, params={name: value})
            found = problem(response.status_code, response.content, response.headers.get("content-type", ""))
            if found:
                problems.append(f"GET {path}?{name}={value!r} {found}")

        send()
    http.close()
    assert problems == []


def test_a_limit_of_superscript_digits_is_a_400(server):
    # Found by the fuzzer: "²".isdigit() is true, but int("²") raises, and the
    # usage plugin's view answered 500.
    response = server.http().get("/v1/usage/sessions", params={"limit": "²"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "limit"


def test_a_refusal_before_the_body_arrived_tells_the_client_to_reconnect(server, admin_key):
    # Found by the fuzzer: a 401 answered before the request body had arrived
    # left the keep-alive connection neither reused nor closed, and the
    # client's next request on it waited forever (fixed in core/app.py, which
    # now says Connection: close). The body is held back until the refusal is
    # in, as a slow client's would be.
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /admin/sessions/cleanup HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        )
        refusal = read_response(sock)
    assert refusal.startswith(b"HTTP/1.1 401")
    assert b"\r\nconnection: close\r\n" in refusal.lower(), "the client must not send its next request on this connection"
    assert server.http().get("/health").status_code == 200


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length body, or b"" when the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
