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


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    """The caller presenting a valid token; 401 saying why otherwise; 429 past its rate."""
    tokens: Tokens = request.app.state.tokens
    if credentials is None:
        raise HTTPException(
            401,
            f"{_route(request)} needs a token: send 'Authorization: Bearer <token>'. The "
            f"admin token is in the manager's data directory ({ADMIN_TOKEN_FILE}); others "
            "are configured under [[api.tokens]]",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    caller = tokens.caller(credentials.credentials)
    if caller is None:
        raise HTTPException(
            401,
            "the bearer token is not one this manager knows: check it against the token "
            "file, or the config's [[api.tokens]] (reloaded only at start)",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    limiter: RateLimiter = request.app.state.limiter
    if wait := limiter.take(caller.name, rate=caller.rate, burst=caller.burst):
        raise HTTPException(
            429,
            f"token {caller.name!r} is over its rate limit (rate_limit requests/s): retry "
            f"after {wait:.2f} s",
            headers={"Retry-After": limiter.retry_after(wait)},
        )
    return caller


def require(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency: the caller, who must hold ``scope`` (admin holds every scope)."""

    async def dependency(request: Request, credentials: Credentials) -> Caller:
        caller = authenticate(request, credentials)
        if not caller.may(scope):
            held = ", ".join(sorted(caller.scopes))
            raise HTTPException(
                403,
                f"token {caller.name!r} lacks the {scope!r} scope that {_route(request)} "
                f"needs (it has: {held}); use a token with that scope",
            )
        return caller

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
