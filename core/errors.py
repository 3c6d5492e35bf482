"""Errors a client can see, and the OpenAI error envelope they travel in.

Every error response, whatever raised it, is
``{"error": {"message", "type", "code", "param"}, "request_id", "timestamp"}`` with
the status code of its class. Messages are written for the client; stack traces
stay in the server log.
"""

from __future__ import annotations

import time
from typing import Any


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def summary(self) -> dict[str, Any]:
        """What a session object says of the error it ended with."""
        return {"message": self.message, "type": self.type, "code": self.code}

    def body(self, request_id: str | None) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param},
            "request_id": request_id,
            "timestamp": int(time.time()),
        }


class InvalidRequest(APIError):
    status = 400
    code = "invalid_request"


class ModelNotFound(APIError):
    status = 404
    code = "model_not_found"


class NotFound(APIError):
    status = 404
    code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status = 413
    code = "request_too_large"


class UpstreamError(APIError):
    """The provider failed: unreachable, an error status, or a broken stream."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class RateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class Overloaded(APIError):
    status = 503
    type = "server_error"
    code = "overloaded"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"
