"""Standard Webhooks signatures: what streamvisor signs its deliveries with,
and what a receiver checks them with.

A receiver installs streamvisor (or copies this one file: it needs only the
standard library) and calls `verify` with the raw body and the headers::

    from streamvisor.webhooks import verify, WebhookVerificationError

    try:
        event = verify(body, request.headers, "whsec_...")
    except WebhookVerificationError:
        return 400

The format is https://www.standardwebhooks.com: a message id
(`webhook-id`), the time it was sent (`webhook-timestamp`, seconds) and the
signatures (`webhook-signature`): space-separated `v1,` + base64 of
HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``, keyed with the secret's bytes
(a secret is ``whsec_`` + their base64). During a rotation a delivery carries
one signature per secret, and a receiver accepts any secret it knows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets as _secrets
import time
from typing import Any, Iterable, Mapping

__all__ = ["WebhookVerificationError", "generate_secret", "sign", "verify", "PREFIX", "TOLERANCE_SECONDS"]

PREFIX = "whsec_"
#: How far a delivery's timestamp may be from the receiver's clock: an older
#: one is refused (a replay), and so is one from the future.
TOLERANCE_SECONDS = 300


class WebhookVerificationError(Exception):
    """The delivery is not one signed with any of the secrets (or is too old)."""


def generate_secret(size: int = 24) -> str:
    """A new secret: ``whsec_`` and the base64 of `size` random bytes."""
    return PREFIX + base64.b64encode(_secrets.token_bytes(size)).decode()


def _key(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret.startswith(PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("a webhook secret is 'whsec_' and base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret holds at least 16 bytes")
    return key


def check_secret(secret: str) -> None:
    """Raise ValueError saying what is wrong with a secret."""
    _key(secret)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,` signature of one delivery with one secret."""
    content = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: Iterable[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one signature per secret."""
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets)


def _header(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> str | None:
    items = headers.items() if hasattr(headers, "items") else headers
    for key, value in items:
        if key.lower() == name:
            return value
    return None


def verify(
    body: bytes | str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    secret: str | Iterable[str],
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check a delivery and return its JSON payload.

    `body` is the request body exactly as received (not re-encoded JSON);
    `headers` any mapping or pairs (names in any case); `secret` one secret or
    several (a rotation). Raises `WebhookVerificationError` when a header is
    missing, the timestamp is more than `tolerance` seconds away, or no
    signature matches any secret.
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    message_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not message_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is {current - timestamp:+.0f} s from now (tolerance {tolerance:g} s)")
    known = [secret] if isinstance(secret, str) else list(secret)
    if not known:
        raise ValueError("verify() needs at least one secret")
    offered = [part.partition(",")[2] for part in signatures.split() if part.startswith("v1,")]
    for candidate in known:
        expected = sign(candidate, message_id, timestamp, raw).partition(",")[2]
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            try:
                return json.loads(raw)
            except ValueError:
                raise WebhookVerificationError("the signed body is not JSON") from None
    raise WebhookVerificationError("no signature matches")
