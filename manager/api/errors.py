"""The error answers every route may give, for the OpenAPI document."""

from __future__ import annotations

from typing import Any

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
