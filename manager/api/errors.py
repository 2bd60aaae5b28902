"""The API's error answers: their shape, which failure gets which, and their description
in the OpenAPI document.

Every error is ``{"error": "...what to do...", "detail": [...]}`` (:class:`ErrorOut`),
whichever path served the request: FastAPI's exception handlers and the lean publish route
(:mod:`manager.api.ingest`) both answer with :func:`answer_for`, so a failure gets the same
status, headers and text on either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from bus.archive import ArchiveUnavailableError
from bus.errors import BusBackpressureError, BusConnectionError, EventValidationError
from manager.api.context import UnknownBotError
from manager.api.models import ErrorOut

_WHY = {
    400: "the body or a parameter is malformed",
    401: "no token, or one this manager does not know",
    403: "the token lacks the scope this call needs",
    404: "no such thing",
    409: "the request conflicts with what is stored (the detail says why; nothing changed)",
    413: "the body is over api.max_body_bytes",
    422: "the request does not fit the API (each problem listed)",
    429: "the token is over its rate limit (see Retry-After)",
    503: "Redis or PostgreSQL is unavailable (see Retry-After)",
}
#: ``responses=`` for a route: every error is an :class:`ErrorOut`.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": why} for code, why in _WHY.items()
}


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error as it is answered: status, message, per item or field details, headers."""

    status: int
    error: str
    detail: list[dict[str, Any]] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        """The JSON body (:class:`ErrorOut`)."""
        out: dict[str, Any] = {"error": self.error}
        if self.detail is not None:
            out["detail"] = self.detail
        try:
            return orjson.dumps(out)
        except orjson.JSONEncodeError:  # a lone surrogate echoed from the input: escaped
            return json.dumps(out, default=str).encode()


def answer_for(exc: Exception) -> ErrorAnswer | None:
    """The answer to a request that raised ``exc``; None for a bug (answered 500 and
    logged by the caller, see :func:`bug`)."""
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers or {})
        if isinstance(exc.detail, dict):
            return ErrorAnswer(
                exc.status_code, exc.detail["error"], exc.detail.get("detail"), headers
            )
        return ErrorAnswer(exc.status_code, str(exc.detail), None, headers)
    if isinstance(exc, EventValidationError):
        return ErrorAnswer(422, str(exc))
    if isinstance(exc, UnknownBotError):
        return ErrorAnswer(404, str(exc))
    if isinstance(exc, ArchiveUnavailableError):
        return ErrorAnswer(
            503, f"the archive (PostgreSQL) is unavailable: {exc}", None, {"Retry-After": "5"}
        )
    if isinstance(exc, BusBackpressureError):
        return ErrorAnswer(503, str(exc), None, {"Retry-After": "10"})
    if isinstance(exc, BusConnectionError):
        return ErrorAnswer(503, str(exc), None, {"Retry-After": "5"})
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return ErrorAnswer(
            503,
            f"Redis is unavailable ({exc}): retry shortly; `multibot status` "
            "says whether the manager is restarting it",
            None,
            {"Retry-After": "5"},
        )
    return None


#: The exception classes :func:`answer_for` knows, for FastAPI's handlers.
ANSWERED: tuple[type[Exception], ...] = (
    HTTPException,
    EventValidationError,
    UnknownBotError,
    ArchiveUnavailableError,
    BusBackpressureError,
    BusConnectionError,
    RedisConnectionError,
    RedisTimeoutError,
)


def bug(exc: Exception) -> ErrorAnswer:
    """The 500 of an exception nothing expected (the caller logs its traceback)."""
    return ErrorAnswer(500, f"internal error ({type(exc).__name__}): see the manager's log")
