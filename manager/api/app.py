"""The manager's HTTP API as a FastAPI application.

Every error, whatever raised it, is answered as :class:`~manager.api.models.ErrorOut`
(``{"error": "...what to do...", "detail": [...]}``): a malformed JSON body is a 400, a body
that does not fit the schema a 422 naming each field, an oversize body a 413, a dead Redis
or PostgreSQL a 503. A 500 means a bug, and is logged with its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bus.archive import ArchiveUnavailableError
from bus.errors import BusBackpressureError, BusConnectionError, EventValidationError
from manager import __version__ as VERSION
from manager.api import audit_routes, deliveries, dlq, events, fleet, health
from manager.api.auth import Tokens
from manager.api.context import ManagerView, UnknownBotError
from manager.api.docs import add_docs
from manager.api.ratelimit import RateLimiter
from manager.config import ApiSettings

log = structlog.get_logger("manager.api")


def create_app(view: ManagerView, settings: ApiSettings, tokens: Tokens) -> FastAPI:
    """The application, bound to a running manager."""
    app = FastAPI(
        title="multibot",
        version=VERSION,
        summary="Publish and query events, watch the fleet, manage dead letters.",
        description=(
            "Every `/v1` call needs `Authorization: Bearer <token>`: the admin token the "
            "manager generates into its data directory (`api-admin.token`), or one configured "
            "under `[[api.tokens]]` with scopes `publish`, `read`, `admin`. Errors are "
            '`{"error": "...", "detail": [...]}`.'
        ),
        # /docs is added below, from local files: FastAPI's own page loads from a CDN
        docs_url=None,
        redoc_url=None,
    )
    app.state.view = view
    app.state.settings = settings
    app.state.tokens = tokens
    app.state.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
    for module in (events, deliveries, fleet, dlq, audit_routes, health):
        app.include_router(module.router)
    add_docs(app)
    _install_error_handlers(app)
    app.add_middleware(_Guard, limit=int(settings.max_body_bytes), view=view)
    return app


def _error(
    status: int,
    message: str,
    detail: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            return _error(
                exc.status_code, exc.detail["error"], exc.detail.get("detail"), exc.headers
            )
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return _error(400, "the body is not valid JSON: send a JSON document", problems)
        where = "; ".join(f"{'.'.join(p['loc'])}: {p['message']}" for p in problems)
        return _error(422, f"the request does not fit the API: {where}", problems)

    @app.exception_handler(EventValidationError)
    async def invalid_event(_: Request, exc: EventValidationError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(UnknownBotError)
    async def unknown_bot(_: Request, exc: UnknownBotError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(ArchiveUnavailableError)
    async def archive_down(_: Request, exc: ArchiveUnavailableError) -> JSONResponse:
        return _error(
            503, f"the archive (PostgreSQL) is unavailable: {exc}", headers={"Retry-After": "5"}
        )

    @app.exception_handler(BusBackpressureError)
    async def redis_full(_: Request, exc: BusBackpressureError) -> JSONResponse:
        return _error(503, str(exc), headers={"Retry-After": "10"})

    @app.exception_handler(BusConnectionError)
    async def redis_down(_: Request, exc: BusConnectionError) -> JSONResponse:
        return _error(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_unreachable(_: Request, exc: Exception) -> JSONResponse:
        return _error(
            503,
            f"Redis is unavailable ({exc}): retry shortly; `multibot status` "
            "says whether the manager is restarting it",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("HTTP API request failed", method=request.method, path=request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}): see the manager's log")


class _Guard:
    """Refuse bodies over ``limit`` bytes with 413 (by Content-Length, or as they stream),
    and count every request by method, route template and status code. One wrapper for
    both: each layer costs every request."""

    def __init__(self, app: ASGIApp, limit: int, view: ManagerView) -> None:
        self.app = app
        self.limit = limit
        self.view = view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        code, seen, started = 500, 0, False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def noted_send(message: Message) -> None:
            nonlocal code, started
            if message["type"] == "http.response.start":
                code, started = message["status"], True
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                raise _TooLarge
            await self.app(scope, counted_receive, noted_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, noted_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.view.count_request(scope["method"], path, code)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(
            413,
            f"the body is over {self.limit} bytes (api.max_body_bytes): send fewer events "
            "per request",
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
