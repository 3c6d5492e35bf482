"""OTLP/protobuf for the otel plugin's spans, written directly as bytes.

The SDK's OTLP/HTTP exporter builds a protobuf message object per span,
attribute and value before it serializes them: about 85 us of the exporter
thread's CPU per span, more than making the span. `encode_request` writes the
same `ExportTraceServiceRequest` bytes (tests/test_otel.py compares the two
decoded) in about a fifth of that: attribute keys, and the key-value pairs of
the values that repeat (a model, a provider, "chat"), are encoded once and
kept, within a bound. `http_exporter` is the SDK's exporter with this encoding
in front of the SDK's own transport (endpoint, headers, TLS, compression,
retries and the OTEL_EXPORTER_OTLP_* variables stay the SDK's); on an SDK
whose transport is laid out differently it exports as the SDK does.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Iterable

__all__ = ["encode_request", "http_exporter"]

_double = struct.Struct("<d").pack
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack

#: Encoded keys, and key-value pairs, kept at most (past it a memo starts over).
MAX_MEMO = 4096
#: Longer string values are not kept.
MAX_MEMO_VALUE = 128

# Field tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 bytes, 5 fixed32).
_RESOURCE_SPANS = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_RESOURCE, _SCOPE_SPANS, _SCHEMA_URL = b"\x0a", b"\x12", b"\x1a"  # ResourceSpans 1, 2, 3
_SCOPE, _SPANS = b"\x0a", b"\x12"  # ScopeSpans 1, 2 (schema_url 3)
_SPAN_ATTRIBUTES, _EVENT_ATTRIBUTES, _RESOURCE_ATTRIBUTES = b"\x4a", b"\x1a", b"\x0a"  # Span 9, Event 3, Resource 1
#: The kind field of trace's SpanKind value (INTERNAL 0, SERVER 1, CLIENT 2,
#: PRODUCER 3, CONSUMER 4): OTLP's numbers are one more.
_KIND_FIELD = tuple(b"\x30" + bytes((value + 1,)) for value in range(5))
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8", "replace"))


def _any_value(value: Any) -> bytes:
    """An AnyValue: string 1, bool 2, int 3, double 4, array 5, bytes 7."""
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, (tuple, list)):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    return _string(b"\x0a", str(value))


_keys: dict[str, bytes] = {}
_pairs: dict[tuple[bytes, str, Any, type], bytes] = {}


def _key(key: str) -> bytes:
    encoded = _keys.get(key)
    if encoded is None:
        if len(_keys) >= MAX_MEMO:
            _keys.clear()
        encoded = _keys[key] = _string(b"\x0a", key)
    return encoded


def _attributes(tag: bytes, attributes: Any) -> bytes:
    """Each attribute a KeyValue (key 1, value 2) in field `tag`."""
    out = b""
    pairs = _pairs
    for key, value in attributes.items():
        kind = type(value)
        if kind is bool or kind is int or (kind is str and len(value) <= MAX_MEMO_VALUE):
            memo = (tag, key, value, kind)
            encoded = pairs.get(memo)
            if encoded is None:
                encoded = _field(tag, _key(key) + _field(b"\x12", _any_value(value)))
                if len(pairs) >= MAX_MEMO:
                    pairs.clear()
                pairs[memo] = encoded
            out += encoded
        else:
            out += _field(tag, _key(key) + _field(b"\x12", _any_value(value)))
    return out


_texts: dict[tuple[bytes, str], bytes] = {}


def _text(tag: bytes, text: str) -> bytes:
    """A string field whose values repeat (span and event names), kept."""
    encoded = _texts.get((tag, text))
    if encoded is None:
        if len(_texts) >= MAX_MEMO:
            _texts.clear()
        encoded = _texts[(tag, text)] = _string(tag, text)
    return encoded


_NO_STATUS = b"\x7a\x00"


def _span(span: Any) -> bytes:
    context = span.context
    out = b"\x0a\x10" + context.trace_id.to_bytes(16, "big") + b"\x12\x08" + context.span_id.to_bytes(8, "big")
    if context.trace_state:
        out += _string(b"\x1a", context.trace_state.to_header())
    # As the SDK's encoder: the flags say whether the parent is remote.
    flags = _HAS_IS_REMOTE
    parent = span.parent
    if parent is not None:
        out += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
        if parent.is_remote:
            flags |= _IS_REMOTE
    out += _text(b"\x2a", span.name) + _KIND_FIELD[span.kind.value] + b"\x39" + _fixed64(span.start_time) + b"\x41" + _fixed64(span.end_time)
    out += _attributes(_SPAN_ATTRIBUTES, span.attributes)
    if span.dropped_attributes:
        out += b"\x50" + _varint(span.dropped_attributes)
    for event in span.events:
        body = b"\x09" + _fixed64(event.timestamp) + _text(b"\x12", event.name)
        if event.attributes:
            body += _attributes(_EVENT_ATTRIBUTES, event.attributes)
        if event.dropped_attributes:
            body += b"\x20" + _varint(event.dropped_attributes)
        out += _field(b"\x5a", body)
    if span.dropped_events:
        out += b"\x60" + _varint(span.dropped_events)
    for link in span.links:
        body = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big") + b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
        if link.attributes:
            body += _attributes(b"\x22", link.attributes)
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        link_flags = _HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0)
        out += _field(b"\x6a", body + b"\x35" + _fixed32(link_flags))
    if span.dropped_links:
        out += b"\x70" + _varint(span.dropped_links)
    # The status is always there, as the SDK writes it (empty when unset).
    status = span.status
    if status.status_code.value or status.description:
        body = _string(b"\x12", status.description) if status.description else b""
        if status.status_code.value:
            body += b"\x18" + _varint(status.status_code.value)
        out += _field(b"\x7a", body)
    else:
        out += _NO_STATUS
    return out + b"\x85\x01" + _fixed32(flags)


def _scope(scope: Any) -> bytes:
    body = _string(b"\x0a", scope.name)
    if scope.version:
        body += _string(b"\x12", scope.version)
    if scope.attributes:
        body += _attributes(b"\x1a", scope.attributes)
    return _field(_SCOPE, body)


#: The encoded resource and scope of the objects seen last, by id (hashing a
#: Resource dumps its attributes to JSON); the object is kept so that its id
#: stays its own.
_heads: dict[int, tuple[Any, bytes]] = {}


def _head(thing: Any, encode: Any) -> bytes:
    known = _heads.get(id(thing))
    if known is None or known[0] is not thing:
        if len(_heads) >= 64:
            _heads.clear()
        known = _heads[id(thing)] = (thing, encode(thing))
    return known[1]


def encode_request(spans: Iterable[Any]) -> bytes:
    """The serialized ExportTraceServiceRequest of these SDK spans (ReadableSpan)."""
    grouped: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        scopes = grouped.get(id(resource))
        if scopes is None:
            scopes = grouped[id(resource)] = (resource, {})
        encoded = scopes[1].get(id(scope))
        if encoded is None:
            encoded = scopes[1][id(scope)] = (scope, [])
        encoded[1].append(_field(_SPANS, _span(span)))
    out = []
    for resource, scopes in grouped.values():
        body = [_field(_RESOURCE, _head(resource, lambda r: _attributes(_RESOURCE_ATTRIBUTES, r.attributes)))]
        for scope, encoded in scopes.values():
            scope_body = _head(scope, _scope) + b"".join(encoded)
            if scope.schema_url:
                scope_body += _string(b"\x1a", scope.schema_url)
            body.append(_field(_SCOPE_SPANS, scope_body))
        if resource.schema_url:
            body.append(_string(_SCHEMA_URL, resource.schema_url))
        out.append(_field(_RESOURCE_SPANS, b"".join(body)))
    return b"".join(out)


@functools.cache
def _exporter_class() -> type:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class FastOTLPSpanExporter(OTLPSpanExporter):  # type: ignore[misc]
        """The SDK's OTLP/HTTP exporter, encoding with `encode_request`."""

        def export(self, spans: Any) -> Any:
            client = getattr(self, "_client", None)
            if getattr(self, "_shutdown", True) or not callable(getattr(client, "export", None)):
                return super().export(spans)
            result = client.export(encode_request(spans))
            return SpanExportResult.SUCCESS if getattr(result, "success", False) else SpanExportResult.FAILURE

    return FastOTLPSpanExporter


def http_exporter(**options: Any) -> Any:
    """The OTLP/HTTP span exporter, with the SDK exporter's options."""
    return _exporter_class()(**options)
