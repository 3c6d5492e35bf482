"""GET /openapi.json: a valid OpenAPI 3.1 document that describes exactly the
routes the server has, plugin routes included, read from real servers."""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from streamvisor.hooks import hookimpl, unwrap

from .conftest import SCRIPTED, ServerThread, start_server

BUILT_INS = """
[plugins.usage]
[plugins.monitor]
[plugins.health]
[plugins.admin]
[plugins.cache]
[plugins.retry]
[plugins.reasoning]
"""

GENERIC = "A route of the"  # how the summary of an undescribed route starts


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with start_server(SCRIPTED + BUILT_INS) as server:
        yield server


def document(server: ServerThread) -> dict[str, Any]:
    response = server.http().get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def served_routes(server: ServerThread) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every rule of the live app's url_map.

    werkzeug adds HEAD to every rule that has GET; the document leaves it
    implied, as OpenAPI documents do, so it is checked apart and left out here.
    """
    rules = server.call(lambda: [(rule.rule, frozenset(rule.methods)) for rule in server.app.url_map.iter_rules()])
    routes = set()
    for rule, methods in rules:
        assert "HEAD" not in methods or "GET" in methods, f"{rule} answers HEAD without GET"
        assert "OPTIONS" not in methods, f"{rule} answers OPTIONS, which no route means to"
        # Written apart from core/openapi.py's conversion, so that it checks it.
        path = re.sub(r"<(?:[^:<>]+:)?([^:<>]+)>", r"{\1}", rule)
        routes |= {(path, method) for method in methods - {"HEAD"}}
    return routes


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item}


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield path, method.upper(), operation


def test_the_document_is_valid_openapi_3_1(server):
    doc = document(server)
    assert doc["openapi"].startswith("3.1.")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


def test_the_document_describes_exactly_the_routes_the_server_has(server):
    served, documented = served_routes(server), documented_routes(document(server))
    assert documented - served == set(), "documented, but the server has no such route"
    assert served - documented == set(), "served, but the document does not say so"
    assert ("/openapi.json", "GET") in documented and ("/v1/chat/completions", "POST") in documented


def test_every_route_of_the_built_in_plugins_is_described(server):
    doc = document(server)
    undescribed = [f"{method} {path}" for path, method, op in operations(doc) if op["summary"].startswith(GENERIC)]
    assert undescribed == []
    for path, method, op in operations(doc):
        # Any route may fail, and every failure is the envelope.
        assert op["responses"]["default"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, f"{method} {path}"
        keyed = op.get("security") == [{"adminKey": []}]
        # The session list is keyed until API keys scope it (docs/security.md).
        assert keyed == (path.startswith("/admin/") or path == "/v1/sessions"), f"{method} {path}: only admin routes take the admin key"


def test_the_error_envelope_is_what_errors_look_like(server):
    doc = document(server)
    envelope = doc["components"]["schemas"]["Error"]
    body = server.http().get("/v1/sessions/sess_nope").json()
    assert set(body) == set(envelope["required"])
    assert set(body["error"]) == set(envelope["properties"]["error"]["required"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "404", "405", "413", "429", "500", "502", "503", "504"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


def test_the_usage_and_admin_routes_document_their_inputs(server):
    paths = document(server)["paths"]

    def query(path: str) -> set[str]:
        return {p["name"] for p in paths[path]["get"]["parameters"] if p["in"] == "query"}

    assert query("/v1/usage") == {"model", "provider", "identity", "team", "since", "until"}
    assert query("/v1/usage/sessions") == {"model", "provider", "identity", "team", "since", "until", "limit"}
    cleanup = paths["/admin/sessions/cleanup"]["post"]["requestBody"]
    assert not cleanup["required"]
    assert set(cleanup["content"]["application/json"]["schema"]["properties"]) == {"idle_seconds", "idle", "finished"}
    invalidate = paths["/admin/cache/invalidate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [set(choice["required"]) for choice in invalidate["oneOf"]] == [{"all"}, {"model"}, {"key"}]
    assert set(paths["/health/ready"]["get"]["responses"]) >= {"200", "503"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    monitor = paths["/v1/monitor/sessions/{session_id}"]["get"]
    assert [p["name"] for p in monitor["parameters"] if p["in"] == "path"] == ["session_id"]


def test_the_document_needs_no_key_and_carries_the_request_id(server, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", "secret")
    response = server.http().get("/openapi.json", headers={"X-Request-ID": "doc-1"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "doc-1"


# -- plugin routes described, half described, and not described -----------------------------


class Shelf:
    """Routes in each form of `openapi`, and in each form of quart path variable."""

    @hookimpl
    def register_routes(self, register):
        async def items():
            return {"items": []}

        async def item(item_id):
            return {"id": item_id}

        async def file(rest):
            return {"file": rest}

        async def kind(kind):
            return {"kind": kind}

        register("/shelf/undescribed", items)
        register(
            "/shelf/items",
            items,
            methods=("GET", "POST"),
            openapi={"get": {"summary": "List the items", "responses": {"200": {"description": "The items."}}}},
        )
        register("/shelf/items/<int:item_id>", item, openapi={"summary": "One item", "responses": {"200": {"description": "The item."}}})
        register("/shelf/files/<path:rest>", file)
        register("/shelf/kinds/<any(book, record):kind>", kind)


@pytest.fixture(scope="module")
def shelf_server() -> Iterator[ServerThread]:
    with start_server("[plugins.shelf]\n[plugins.example]\n", plugins={"shelf": Shelf()}) as server:
        yield server


def test_a_route_registered_without_openapi_still_appears(shelf_server):
    doc = document(shelf_server)
    assert OpenAPIV31SpecValidator(doc).is_valid()
    assert documented_routes(doc) == served_routes(shelf_server)
    bare = doc["paths"]["/shelf/undescribed"]["get"]
    assert "shelf" in bare["summary"] and bare["summary"].startswith(GENERIC)
    assert bare["tags"] == ["shelf"]
    assert bare["responses"]["default"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    # And the route is there to call.
    assert shelf_server.http().get("/shelf/undescribed").json() == {"items": []}


def test_an_operation_per_method_or_one_for_all(shelf_server):
    paths = document(shelf_server)["paths"]
    assert paths["/shelf/items"]["get"]["summary"] == "List the items"
    assert paths["/shelf/items"]["post"]["summary"].startswith(GENERIC), "a method left out gets the generic operation"
    described = paths["/shelf/items/{item_id}"]["get"]
    assert described["summary"] == "One item"
    assert described["tags"] == ["shelf"] and described["operationId"]
    assert "default" in described["responses"] and "200" in described["responses"]
    hello = paths["/example/hello"]["get"]
    assert hello["summary"] == "Say hello" and hello["tags"] == ["example"]


def test_quart_path_variables_become_path_parameters(shelf_server):
    paths = document(shelf_server)["paths"]

    def parameter(path: str) -> dict[str, Any]:
        (only,) = [p for p in paths[path]["get"]["parameters"] if p["in"] == "path"]
        assert only["required"] is True
        return only

    assert parameter("/shelf/items/{item_id}")["schema"] == {"type": "integer", "minimum": 0}
    assert parameter("/shelf/files/{rest}")["name"] == "rest"
    assert parameter("/shelf/kinds/{kind}")["schema"] == {"enum": ["book", "record"]}
    http = shelf_server.http()
    assert http.get("/shelf/items/7").json() == {"id": 7}
    assert http.get("/shelf/files/a/b.txt").json() == {"file": "a/b.txt"}


class WrongMethod:
    @hookimpl
    def register_routes(self, register):
        async def view():
            return {}

        register("/wrong", view, openapi={"post": {"responses": {"200": {"description": "ok"}}}})


class NotADict:
    @hookimpl
    def register_routes(self, register):
        async def view():
            return {}

        register("/wrong", view, openapi=["summary"])


@pytest.mark.parametrize(
    "plugin, says",
    [(WrongMethod(), "describes POST, which the route does not have"), (NotADict(), "is list, not a dict")],
    ids=["a method the route lacks", "not a dict"],
)
def test_a_wrong_openapi_stops_start_up_naming_the_plugin(plugin, says):
    with pytest.raises(RuntimeError) as caught:
        with start_server("[plugins.wrong]\n", plugins={"wrong": plugin}):
            pass
    cause = str(unwrap(caught.value.__cause__))
    assert "plugin 'wrong' failed in its register_routes hook" in cause and says in cause
