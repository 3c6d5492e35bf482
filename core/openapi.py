"""The OpenAPI 3.1 description of the HTTP API, served at `GET /openapi.json`.

This module owns that document: the operations of the core routes (the chat
completion request as `ChatRequest.from_openai` checks it, the responses, and
the error envelope of core/errors.py), the checking of the `openapi` operations
plugins pass to `register(path, view, methods, openapi=...)`, and the assembly
of the whole document from both. Quart path syntax (`<name>`, `<int:name>`)
becomes OpenAPI's `{name}` with a path parameter; a plugin route registered
without an operation still appears, with a short generic one.
"""

from __future__ import annotations

import copy
import re
from importlib import metadata
from typing import Any, Iterable, Mapping

import orjson

from .chat import ROLES
from .sessions import STATES

OPENAPI_VERSION = "3.1.0"

#: The security scheme of admin routes; a plugin's operation names it in `security`.
ADMIN_SCHEME = "adminKey"

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

#: A variable of a werkzeug rule: `<name>`, `<converter:name>`, `<converter(args):name>`.
_RULE_VARIABLE = re.compile(r"<(?:(?P<converter>[A-Za-z_]\w*)(?:\((?P<args>[^)]*)\))?:)?(?P<name>[A-Za-z_]\w*)>")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(description: str) -> dict[str, Any]:
    """A response object whose body is the error envelope."""
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def json_body(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# -- schemas -----------------------------------------------------------------------

_NULLABLE_STRING = {"type": ["string", "null"]}

#: Integers are 64-bit: the JSON parser reads larger ones as floats, which
#: integer fields refuse.
_INT64_MAX = (1 << 63) - 1

_ERROR = {
    "type": "object",
    "description": "The OpenAI error envelope: every error response, whatever raised it, has this body.",
    "required": ["error", "request_id", "timestamp"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code", "param"],
            "properties": {
                "message": {"type": "string", "description": "What went wrong, written for the client."},
                "type": {"type": "string", "examples": ["invalid_request_error", "server_error", "upstream_error"]},
                "code": {**_NULLABLE_STRING, "examples": ["invalid_request", "not_found", "model_not_found"]},
                "param": {**_NULLABLE_STRING, "description": "The request parameter at fault, when one is."},
            },
        },
        "request_id": {**_NULLABLE_STRING, "description": "The request's id, also in the X-Request-ID header."},
        "timestamp": {"type": "integer", "description": "Unix seconds."},
    },
}

_CONTENT_PART = {
    "type": "object",
    "description": "A part of a multi-part content; the text of `text` parts is the message's text.",
    "required": ["type"],
    "properties": {"type": {"type": "string", "examples": ["text", "image_url"]}, "text": {"type": "string"}},
    # A text part has its text.
    "anyOf": [{"properties": {"type": {"not": {"const": "text"}}}}, {"required": ["text"]}],
}

_MESSAGE = {
    "type": "object",
    "description": "An OpenAI chat message. Other fields (name, tool_calls, tool_call_id, ...) are passed to the provider.",
    "required": ["role"],
    "properties": {
        "role": {"enum": sorted(ROLES)},
        "content": {"type": ["string", "array", "null"], "items": _CONTENT_PART},
    },
    # Only an assistant message may go without content.
    "anyOf": [
        {"properties": {"role": {"const": "assistant"}}},
        {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
    ],
}

_CHAT_REQUEST = {
    "type": "object",
    "description": "An OpenAI chat completion request. Parameters not listed here (tools, response_format, ...) are passed to the provider unchanged.",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": "A model id of GET /v1/models."},
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "stream": {"type": ["boolean", "null"], "default": False, "description": "Answer with Server-Sent Events."},
        "background": {
            "type": ["boolean", "null"],
            "default": False,
            "description": (
                "streamvisor's extension: the session outlives the request. Without `stream` the answer is 202 with the session "
                "object at once; with `stream` the session goes on when the client goes away. Collect it at /v1/sessions/{session_id}."
            ),
        },
        "stream_options": {
            "type": ["object", "null"],
            "description": "Only with `stream` true.",
            "properties": {"include_usage": {"type": "boolean", "default": False}},
        },
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT64_MAX},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": _INT64_MAX, "description": "Wins over max_tokens."},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "stop": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}],
        },
        "seed": {"type": ["integer", "null"], "minimum": -(1 << 63), "maximum": _INT64_MAX},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1, "description": "Only 1 is supported."},
        "user": _NULLABLE_STRING,
    },
    "dependentSchemas": {
        "stream_options": {"anyOf": [{"properties": {"stream_options": {"type": "null"}}}, {"required": ["stream"], "properties": {"stream": {"const": True}}}]},
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "completion_tokens_details": {"type": "object", "properties": {"reasoning_tokens": {"type": "integer"}}},
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
        "cost_usd": {"type": ["number", "null"], "description": "What the session cost in US dollars, when a plugin prices it."},
    },
}

_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": _NULLABLE_STRING,
                            "reasoning_content": {"type": "string"},
                            "tool_calls": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                    "logprobs": {"type": "null"},
                    "finish_reason": _NULLABLE_STRING,
                },
            },
        },
        "usage": _ref("Usage"),
    },
}

_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

_NULLABLE_MS = {"type": ["number", "null"]}

_SESSION = {
    "type": "object",
    "required": ["id", "object", "state", "model", "provider", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "session"},
        "request_id": {"type": "string"},
        "identity": {"type": "string"},
        "team": {**_NULLABLE_STRING, "description": "The caller's team, when its API key belongs to one."},
        "key_id": {**_NULLABLE_STRING, "description": "The id of the API key the session was made with."},
        "model": {"type": "string"},
        "provider": {"type": "string"},
        "state": {"enum": list(STATES)},
        "finish_reason": _NULLABLE_STRING,
        "created": {"type": "integer"},
        "chunks": {"type": "integer"},
        "timings": {
            "type": "object",
            "properties": {
                "started_ms": _NULLABLE_MS,
                "first_token_ms": _NULLABLE_MS,
                "finished_ms": _NULLABLE_MS,
                "duration_ms": {"type": "number"},
            },
        },
        "usage": {"allOf": [_ref("Usage")], "properties": {"exact": {"type": "boolean"}}},
        "error": {
            "type": ["object", "null"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": _NULLABLE_STRING},
        },
        "background": {"type": "boolean"},
        "transcript": {"enum": ["kept", "not_stored", "purged"], "description": "Whether its chunks can still be read."},
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "ChatMessage": _MESSAGE,
    "ChatCompletionRequest": _CHAT_REQUEST,
    "ChatCompletion": _COMPLETION,
    "Usage": _USAGE,
    "Model": _MODEL,
    "Session": _SESSION,
}


# -- the core routes ------------------------------------------------------------------

#: What any route may answer: an error of a status not listed, in the envelope.
_DEFAULT_ERROR = error_response("An error, in the OpenAI error envelope.")

_SESSION_ID = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "description": "A session id (the X-Session-ID header of a chat completion).",
    "schema": {"type": "string", "pattern": "^[^/]+$"},
}

def _query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_CHAT = {
    "operationId": "createChatCompletion",
    "summary": "Create a chat completion",
    "description": (
        "An OpenAI-compatible chat completion, streamed as Server-Sent Events when `stream` is true. The response's "
        "X-Session-ID header names the session (see /v1/sessions/{session_id}). An error after the first chunk "
        "of a stream arrives as a last `data:` event holding the error envelope, instead of `data: [DONE]`."
    ),
    "tags": ["chat"],
    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
    "responses": {
        "202": json_body("With `background` true and no `stream`: the session, started (X-Session-ID, Location).", _ref("Session")),
        "200": {
            "description": "The completion: a JSON object, or with `stream` true an event stream of `chat.completion.chunk` objects ending with `data: [DONE]`.",
            "content": {
                "application/json": {"schema": _ref("ChatCompletion")},
                # The schema of one event, as OpenAPI 3.2's itemSchema would say.
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": (
                            "One event. `data` is a chat.completion.chunk object as JSON; the last event's data is `[DONE]`, "
                            "or the error envelope when the stream failed after its first chunk. `id` is the chunk's offset in the session."
                        ),
                        "required": ["data"],
                        "properties": {"data": {"type": "string"}, "id": {"type": "string"}},
                    }
                },
            },
        },
        "400": error_response("The body is not a valid chat completion request (`param` names the field)."),
        "404": error_response("No provider serves the model (`model_not_found`)."),
        "405": error_response("Another method than POST."),
        "413": error_response("The body is larger than `[server] max_body_bytes`."),
        "429": error_response("The upstream provider is rate limiting, or the identity has `[server] max_background_sessions` running."),
        "500": error_response("The server failed to handle the request."),
        "502": error_response("The upstream provider failed."),
        "503": error_response("The server is at one of its limits (`overloaded`, with Retry-After)."),
        "504": error_response("The upstream provider did not answer in time."),
        "default": _DEFAULT_ERROR,
    },
}

CORE_OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/chat/completions": {"post": _CHAT},
    "/v1/models": {
        "get": {
            "operationId": "listModels",
            "summary": "List the models",
            "tags": ["models"],
            "responses": {
                "200": json_body(
                    "Every model the providers serve.",
                    {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
                ),
                "default": _DEFAULT_ERROR,
            },
        }
    },
    "/v1/sessions": {
        "get": {
            "operationId": "listSessions",
            "summary": "List sessions, newest first",
            "description": (
                "Sessions in memory, and every stored one when the store plugin is on. Cursor pagination: pass `next_cursor` as `after`. "
                "Needs the admin key until API keys scope the list to a caller's own sessions."
            ),
            "tags": ["sessions"],
            "security": [{ADMIN_SCHEME: []}],
            "parameters": [
                _query_param("state", "Only sessions in this state.", {"enum": list(STATES)}),
                _query_param("model", "Only sessions of this model.", {"type": "string", "minLength": 1, "maxLength": 256}),
                _query_param("identity", "Only sessions of this identity.", {"type": "string", "minLength": 1, "maxLength": 256}),
                _query_param("since", "Created at or after (unix seconds).", {"type": "number", "minimum": 0}),
                _query_param("until", "Created before (unix seconds).", {"type": "number", "minimum": 0}),
                _query_param("limit", "At most this many (default 20).", {"type": "integer", "minimum": 1, "maximum": 100}),
                _query_param("after", "The `next_cursor` of the previous page.", {"type": "string"}),
            ],
            "responses": {
                "200": json_body(
                    "A page of sessions.",
                    {
                        "type": "object",
                        "required": ["object", "data", "has_more", "next_cursor"],
                        "properties": {
                            "object": {"const": "list"},
                            "data": {"type": "array", "items": _ref("Session")},
                            "has_more": {"type": "boolean"},
                            "next_cursor": _NULLABLE_STRING,
                        },
                    },
                ),
                "400": error_response("A filter is not valid (`param` names it)."),
                "401": error_response("A missing or wrong admin key."),
                "403": error_response("Admin routes are disabled: STREAMVISOR_ADMIN_KEY is not set."),
                "default": _DEFAULT_ERROR,
            },
        }
    },
    "/v1/sessions/{session_id}": {
        "get": {
            "operationId": "getSession",
            "summary": "A session's state, usage and timings",
            "description": "Live sessions, finished ones for `[server] session_retention_seconds`, and with the store plugin every stored one.",
            "tags": ["sessions"],
            "parameters": [_SESSION_ID],
            "responses": {
                "200": json_body("The session.", _ref("Session")),
                "404": error_response("No such session."),
                "410": error_response("The session was deleted or purged (`session_gone`)."),
                "default": _DEFAULT_ERROR,
            },
        },
        "delete": {
            "operationId": "deleteSession",
            "summary": "Delete a session, its transcript and its usage record",
            "description": "A live session is stopped first. Later reads answer 410.",
            "tags": ["sessions"],
            "parameters": [_SESSION_ID],
            "responses": {
                "200": json_body(
                    "It was deleted.",
                    {"type": "object", "required": ["id", "object", "deleted"], "properties": {"id": {"type": "string"}, "object": {"const": "session.deleted"}, "deleted": {"const": True}}},
                ),
                "404": error_response("No such session."),
                "410": error_response("Deleted or purged already."),
                "default": _DEFAULT_ERROR,
            },
        },
    },
    "/v1/sessions/{session_id}/stream": {
        "get": {
            "operationId": "followSession",
            "summary": "Follow or replay a session's stream",
            "description": (
                "The session's chunks in the wire format of its stream, with the same `id:` values: from the start, or after "
                "`starting_after` or the `Last-Event-ID` header. A live session is followed to its end; a finished one is replayed."
            ),
            "tags": ["sessions"],
            "parameters": [
                _SESSION_ID,
                _query_param("starting_after", "Resume after this chunk offset (an `id:` value).", {"type": "integer", "minimum": -1, "maximum": 10**17}),
                {"name": "Last-Event-ID", "in": "header", "required": False, "description": "Resume after this `id:` (what EventSource sends).", "schema": {"type": "string", "pattern": "^-?[0-9]{1,17}$"}},
            ],
            "responses": {
                "200": {
                    "description": "An event stream of chat.completion.chunk objects ending with `data: [DONE]` (or the error envelope).",
                    "content": {
                        "text/event-stream": {
                            "schema": {
                                "type": "object",
                                "description": "One event, as in the original stream; the first also carries `retry`.",
                                "required": ["data"],
                                "properties": {"data": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}},
                            }
                        }
                    },
                },
                "400": error_response("`starting_after` or `Last-Event-ID` is not an integer."),
                "404": error_response("No such session."),
                "410": error_response("Its chunks are no longer kept (`session_gone`)."),
                "default": _DEFAULT_ERROR,
            },
        }
    },
    "/v1/sessions/{session_id}/completion": {
        "get": {
            "operationId": "getSessionCompletion",
            "summary": "A session's output as a chat.completion",
            "description": "Partial while the session runs (`finish_reason` null, usage estimated); `session` says its state.",
            "tags": ["sessions"],
            "parameters": [_SESSION_ID],
            "responses": {
                "200": json_body(
                    "The completion so far.",
                    {"allOf": [_ref("ChatCompletion")], "required": ["session"], "properties": {"session": {"type": "object"}}},
                ),
                "404": error_response("No such session."),
                "410": error_response("Its chunks are no longer kept (`session_gone`)."),
                "default": _DEFAULT_ERROR,
            },
        }
    },
    "/v1/sessions/{session_id}/stop": {
        "post": {
            "operationId": "stopSession",
            "summary": "Stop a live session",
            "description": "Cancels the session (its stream ends with `finish_reason` \"stopped\") and waits up to 5 s for it to finish. Stopping a finished session changes nothing.",
            "tags": ["sessions"],
            "parameters": [_SESSION_ID],
            "responses": {
                "200": json_body(
                    "The session after the stop; `stopped` says whether this call stopped it.",
                    {"allOf": [_ref("Session")], "required": ["stopped"], "properties": {"stopped": {"type": "boolean"}}},
                ),
                "404": error_response("No such session."),
                "410": error_response("The session was deleted or purged."),
                "default": _DEFAULT_ERROR,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenAPI",
            "summary": "This document",
            "tags": ["meta"],
            "responses": {
                "200": json_body("The OpenAPI 3.1 document of the whole API, plugin routes included.", {"type": "object"}),
                "default": _DEFAULT_ERROR,
            },
        }
    },
}

_CORE_TAGS = [
    {"name": "chat", "description": "OpenAI-compatible chat completions."},
    {"name": "models", "description": "The models the providers serve."},
    {"name": "sessions", "description": "Every completion runs as a session, which outlives its request for a while."},
    {"name": "meta", "description": "About the API itself."},
]


# -- plugin operations -------------------------------------------------------------------


def plugin_operations(openapi: Any, methods: Iterable[str], path: str) -> dict[str, dict[str, Any]]:
    """Check what a plugin passed as `openapi` for a route and return one
    operation per method (upper-case method names). It is either one operation
    object for all the route's methods, or a mapping of methods (`"get"`, ...)
    to operation objects. Raises `TypeError` or `ValueError` saying what is wrong."""
    methods = [m.upper() for m in methods]
    if openapi is None:
        return {}
    if not isinstance(openapi, Mapping):
        raise TypeError(f"the openapi of route {path} is {type(openapi).__name__}, not a dict (an OpenAPI operation object, or one per method)")
    if openapi and all(isinstance(key, str) and key.lower() in _METHODS for key in openapi):
        operations = {key.upper(): value for key, value in openapi.items()}
        extra = sorted(set(operations) - set(methods))
        if extra:
            raise ValueError(f"the openapi of route {path} describes {', '.join(extra)}, which the route does not have (its methods: {', '.join(methods)})")
    else:
        operations = {method: openapi for method in methods}
    out = {}
    for method, operation in operations.items():
        if not isinstance(operation, Mapping):
            raise TypeError(f"the openapi of route {method} {path} is {type(operation).__name__}, not a dict (an OpenAPI operation object)")
        try:
            # A copy, which must survive the trip to JSON: found now, not at the first GET /openapi.json.
            out[method] = orjson.loads(orjson.dumps(operation))
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise TypeError(f"the openapi of route {method} {path} cannot be encoded as JSON: {exc}") from None
    return out


def openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    """A quart rule as an OpenAPI path, with a parameter object per variable:
    `/items/<int:item_id>` is `/items/{item_id}` with an integer `item_id`."""
    parameters = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        parameters.append({"name": name, "in": "path", "required": True, "schema": _converter_schema(match["converter"], match["args"])})
        return "{" + name + "}"

    return _RULE_VARIABLE.sub(replace, rule), parameters


def _converter_schema(converter: str | None, args: str | None) -> dict[str, Any]:
    # werkzeug's converters: `int` and `float` are unsigned unless signed=True.
    signed = bool(args and re.search(r"signed\s*=\s*True", args))
    if converter == "int":
        return {"type": "integer"} if signed else {"type": "integer", "minimum": 0}
    if converter == "float":
        return {"type": "number"} if signed else {"type": "number", "minimum": 0}
    if converter == "uuid":
        return {"type": "string", "format": "uuid"}
    if converter == "any" and args:
        return {"enum": [item.strip().strip("'\"") for item in args.split(",") if item.strip()]}
    if converter == "path":
        return {"type": "string", "minLength": 1}
    return {"type": "string", "pattern": "^[^/]+$"}


def _generic_operation(plugin: str, method: str, path: str) -> dict[str, Any]:
    return {
        "summary": f"A route of the `{plugin}` plugin",
        "description": f"The `{plugin}` plugin registered {method} {path} without describing it.",
        "responses": {"2XX": {"description": "The route's answer (undescribed)."}, "default": copy.deepcopy(_DEFAULT_ERROR)},
    }


def _operation_id(plugin: str, method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path)
    return "_".join([plugin, method.lower(), *words])


# -- the document ---------------------------------------------------------------------


def build(routes: Iterable[Any], version: str | None = None) -> dict[str, Any]:
    """The whole document: the core routes, then every route of `routes` (the
    runtime's `PluginRoute`s) with its plugin's operation or a generic one."""
    paths: dict[str, dict[str, Any]] = copy.deepcopy(CORE_OPERATIONS)
    tags = list(_CORE_TAGS)
    operation_ids = {op["operationId"] for item in paths.values() for op in item.values()}
    for route in routes:
        path, variables = openapi_path(route.path)
        item = paths.setdefault(path, {})
        given = getattr(route, "openapi", None) or {}
        for method in route.methods:
            key = method.lower()
            if key in item:
                continue  # the same path and method twice: quart serves the first
            operation = copy.deepcopy(given[method.upper()]) if method.upper() in given else _generic_operation(route.plugin, method.upper(), route.path)
            operation.setdefault("tags", [route.plugin])
            responses = operation.setdefault("responses", {})
            if "default" not in responses:
                responses["default"] = copy.deepcopy(_DEFAULT_ERROR)
            declared = {p.get("name") for p in operation.get("parameters", ()) if isinstance(p, Mapping) and p.get("in") == "path"}
            missing = [p for p in variables if p["name"] not in declared]
            if missing:
                operation["parameters"] = [*operation.get("parameters", ()), *copy.deepcopy(missing)]
            # An operationId is unique in a document: a second use of one,
            # given or made, gets a suffix.
            base = candidate = str(operation.get("operationId") or _operation_id(route.plugin, key, route.path))
            n = 2
            while candidate in operation_ids:
                candidate, n = f"{base}_{n}", n + 1
            operation["operationId"] = candidate
            operation_ids.add(candidate)
            item[key] = operation
        if not any(tag["name"] == route.plugin for tag in tags):
            tags.append({"name": route.plugin, "description": f"Routes of the `{route.plugin}` plugin."})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "streamvisor",
            "version": version or _version(),
            "description": (
                "An OpenAI-compatible streaming gateway. Every response carries X-Request-ID and Server-Timing; "
                "every error, whatever its status, has the error envelope as its body."
            ),
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {
                ADMIN_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of the STREAMVISOR_ADMIN_KEY environment variable. Without it set, admin routes answer 403.",
                }
            },
        },
    }


def _version() -> str:
    try:
        return metadata.version("streamvisor")
    except metadata.PackageNotFoundError:
        return "0.0.0"
