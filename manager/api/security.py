"""FastAPI dependencies that authenticate, authorise and rate-limit a request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from manager.api.auth import ADMIN_TOKEN_FILE, Caller, Tokens
from manager.api.ratelimit import RateLimiter

_bearer = HTTPBearer(auto_error=False, description="a token from the config, or the admin token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_CHALLENGE = 'Bearer realm="multibot"'


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` header's value, read as FastAPI's ``HTTPBearer``
    reads it; None for no header, no token or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if not (scheme and token) or scheme.lower() != "bearer":
        return None
    return token


def authorize(
    tokens: Tokens, limiter: RateLimiter, token: str | None, route: str, scope: str
) -> Caller:
    """The caller presenting ``token`` to ``route`` (``"POST /v1/events"``), holding
    ``scope`` (admin holds every scope); 401 saying why otherwise, 429 past its rate, 403
    without the scope."""
    if token is None:
        raise HTTPException(
            401,
            f"{route} needs a token: send 'Authorization: Bearer <token>'. The "
            f"admin token is in the manager's data directory ({ADMIN_TOKEN_FILE}); others "
            "are configured under [[api.tokens]]",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    caller = tokens.caller(token)
    if caller is None:
        raise HTTPException(
            401,
            "the bearer token is not one this manager knows: check it against the token "
            "file, or the config's [[api.tokens]] (reloaded only at start)",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    if wait := limiter.take(caller.name, rate=caller.rate, burst=caller.burst):
        raise HTTPException(
            429,
            f"token {caller.name!r} is over its rate limit (rate_limit requests/s): retry "
            f"after {wait:.2f} s",
            headers={"Retry-After": limiter.retry_after(wait)},
        )
    if not caller.may(scope):
        held = ", ".join(sorted(caller.scopes))
        raise HTTPException(
            403,
            f"token {caller.name!r} lacks the {scope!r} scope that {route} "
            f"needs (it has: {held}); use a token with that scope",
        )
    return caller


def require(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency: the caller, who must hold ``scope`` (admin holds every scope)."""

    async def dependency(request: Request, credentials: Credentials) -> Caller:
        state = request.app.state
        token = None if credentials is None else credentials.credentials
        return authorize(state.tokens, state.limiter, token, _route(request), scope)

    return dependency


def require_unless_open(scope: str) -> Callable[..., Awaitable[Caller | None]]:
    """Like :func:`require`, but nobody needs a token while ``api.open_status`` is on."""
    strict = require(scope)

    async def dependency(request: Request, credentials: Credentials) -> Caller | None:
        if request.app.state.settings.open_status and credentials is None:
            return None
        return await strict(request, credentials)

    return dependency


#: The caller of a route, holding the scope it needs.
Publisher = Annotated[Caller, Depends(require("publish"))]
Reader = Annotated[Caller, Depends(require("read"))]
Admin = Annotated[Caller, Depends(require("admin"))]
#: Anyone while ``api.open_status`` is on, else a reader.
Watcher = Annotated[Caller | None, Depends(require_unless_open("read"))]
