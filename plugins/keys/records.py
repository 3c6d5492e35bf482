"""API keys and teams as the keys plugin keeps them, and the rules for the
values an operator sets (the admin API, the CLI).

A key's secret is `sk-sv-` and 32 URL-safe characters (192 random bits). The
store keeps only its SHA-256: with that much randomness no dictionary or
brute-force attack can find a secret from its hash, so a slow password hash
would only cost every request time. The first characters of the secret are
kept too (`sk-sv-AbCd…`), so that people can tell their keys apart.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import hashlib
import math
import re
import secrets
import time
from typing import Any

import attrs

from streamvisor.hooks import InvalidRequest

SECRET_PREFIX = "sk-sv-"
#: Record kinds in the store.
KEY_KIND = "keys:key"
TEAM_KIND = "keys:team"
SPEND_KIND = "keys:spend"
PERIODS = ("day", "month")
ROLES = ("member", "team_admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+\-]{0,127}$")

#: The limit fields a key and a team share.
LIMITS = ("rpm_limit", "tpm_limit", "max_concurrent_streams", "max_budget_usd", "budget_period")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(24)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


def period_label(period: str | None, at: float) -> str:
    """The budget period `at` falls in (UTC): "d2026-12-01", "m2026-12", or ""
    for a budget without a period."""
    if period is None:
        return ""
    return _label(period, int(at))


def period_end(period: str | None, at: float) -> float | None:
    """When the budget period `at` falls in ends (UTC), or None."""
    if period is None:
        return None
    return _end(period, int(at))


# Every request asks for its periods several times: formatting dates showed in
# the profile. A second resolves to the same answers.
@functools.lru_cache(maxsize=8)
def _label(period: str, second: int) -> str:
    day = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
    return f"d{day:%Y-%m-%d}" if period == "day" else f"m{day:%Y-%m}"


@functools.lru_cache(maxsize=8)
def _end(period: str, second: int) -> float:
    day = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
    start = day.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + datetime.timedelta(days=1)
    else:
        start = start.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return end.timestamp()


@attrs.frozen
class Limits:
    """Limits a key or a team may carry; None means no limit."""

    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_concurrent_streams: int | None = None
    max_budget_usd: float | None = None
    budget_period: str | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMITS[:4])

    @classmethod
    def of(cls, data: dict[str, Any]) -> "Limits":
        return cls(*(data.get(name) for name in LIMITS))


@attrs.frozen
class Key:
    id: str
    name: str
    identity: str
    team: str | None
    role: str
    #: Patterns of the model names it may use (fnmatch); empty: every model.
    models: tuple[str, ...]
    limits: Limits
    expires_at: float | None
    metadata: dict[str, Any]
    revoked: bool
    created_at: float
    #: The first characters of the secret, to tell keys apart.
    shown: str
    revoked_at: float | None = None
    rotated_at: float | None = None
    #: The SHA-256 of the secret (the store's lookup of the key).
    hash: str = ""

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @classmethod
    def of(cls, data: dict[str, Any]) -> "Key":
        return cls(
            id=data["id"],
            name=data.get("name", ""),
            identity=data["identity"],
            team=data.get("team"),
            role=data.get("role", "member"),
            models=tuple(data.get("models") or ()),
            limits=Limits.of(data),
            expires_at=data.get("expires_at"),
            metadata=dict(data.get("metadata") or {}),
            revoked=bool(data.get("revoked")),
            created_at=data.get("created_at", 0.0),
            shown=data.get("shown", ""),
            revoked_at=data.get("revoked_at"),
            rotated_at=data.get("rotated_at"),
            hash=data.get("hash", ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "identity": self.identity,
            "team": self.team,
            "role": self.role,
            "models": list(self.models),
            **attrs.asdict(self.limits),
            "expires_at": self.expires_at,
            "metadata": self.metadata,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
            "rotated_at": self.rotated_at,
            "created_at": self.created_at,
            "secret_prefix": self.shown,
        }


@attrs.frozen
class Team:
    name: str
    models: tuple[str, ...]
    limits: Limits
    metadata: dict[str, Any]
    created_at: float

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @classmethod
    def of(cls, data: dict[str, Any]) -> "Team":
        return cls(data["name"], tuple(data.get("models") or ()), Limits.of(data), dict(data.get("metadata") or {}), data.get("created_at", 0.0))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "object": "team", "models": list(self.models), **attrs.asdict(self.limits), "metadata": self.metadata, "created_at": self.created_at}


# -- what an operator may set --------------------------------------------------------------

#: The fields `POST /admin/keys` and `PATCH /admin/keys/{id}` accept.
KEY_FIELDS = ("name", "identity", "team", "role", "models", *LIMITS, "expires_at", "metadata")
TEAM_FIELDS = ("models", *LIMITS, "metadata")


def _bad(name: str, expected: str, value: Any) -> InvalidRequest:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return InvalidRequest(f"'{name}' must be {expected}, got {shown}", param=name)


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(name, "a whole number of at least 1, or null for no limit", value)
    return value


def checked(body: Any, fields: tuple[str, ...], *, partial: bool) -> dict[str, Any]:
    """The fields of a create (partial=False) or update body, validated; a 400
    naming the field for anything wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidRequest(f"unknown field '{unknown[0]}'; the fields are: {', '.join(fields)}", param=unknown[0])
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name in ("name",):
            if not isinstance(value, str) or not 1 <= len(value) <= 200:
                raise _bad(name, "a string of 1 to 200 characters", value)
        elif name in ("identity", "team"):
            if value is None and name == "team":
                pass
            elif not isinstance(value, str) or not _NAME.fullmatch(value):
                raise _bad(name, "a name of 1 to 128 letters, digits and . _ @ : + -", value)
            if name == "identity" and value in ("admin", "anonymous"):
                raise _bad(name, "an identity other than the reserved 'admin' and 'anonymous'", value)
        elif name == "role":
            if value not in ROLES:
                raise _bad(name, f"one of {', '.join(ROLES)}", value)
        elif name == "models":
            if not isinstance(value, list) or not all(isinstance(m, str) and 1 <= len(m) <= 256 for m in value) or len(value) > 1000:
                raise _bad(name, "a list of model names or patterns (fnmatch: * and ?); empty for every model", value)
        elif name in ("rpm_limit", "tpm_limit", "max_concurrent_streams"):
            value = _positive_int(name, value)
        elif name == "max_budget_usd":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise _bad(name, "a number of US dollars of at least 0, or null for no budget", value)
            value = None if value is None else float(value)
        elif name == "budget_period":
            if value is not None and value not in PERIODS:
                raise _bad(name, "'day', 'month' or null (a budget that never resets)", value)
        elif name == "expires_at":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise _bad(name, "a unix time in seconds, or null for never", value)
            value = None if value is None else float(value)
        elif name == "metadata":
            if not isinstance(value, dict) or len(str(value)) > 16_384:
                raise _bad(name, "a JSON object (at most 16 KiB)", value)
        out[name] = value
    if not partial and "identity" not in out:
        raise InvalidRequest("'identity' is required: who owns the key (their sessions and usage are theirs)", param="identity")
    return out


def now() -> float:
    return time.time()
