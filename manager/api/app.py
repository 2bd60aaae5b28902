"""The manager's HTTP API as a FastAPI application, with ``POST /v1/events`` answered
ahead of it on a lean route (:mod:`manager.api.ingest`).

Every error, whatever raised it, is answered as :class:`~manager.api.models.ErrorOut`
(``{"error": "...what to do...", "detail": [...]}``, see :mod:`manager.api.errors`): a
malformed JSON body is a 400, a body that does not fit the schema a 422 naming each field,
an oversize body a 413, a dead Redis or PostgreSQL a 503. A 500 means a bug, and is logged
with its traceback.
"""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from manager import __version__ as VERSION
from manager.api import audit_routes, deliveries, dlq, events, fleet, health
from manager.api.auth import Tokens
from manager.api.context import ManagerView
from manager.api.docs import add_docs
from manager.api.errors import ANSWERED, ErrorAnswer, answer_for, bug
from manager.api.ingest import PublishRoute
from manager.api.ratelimit import RateLimiter
from manager.config import ApiSettings

log = structlog.get_logger("manager.api")


def create_app(view: ManagerView, settings: ApiSettings, tokens: Tokens) -> PublishRoute:
    """The application, bound to a running manager: ``POST /v1/events`` answered on the
    lean route, every other request by FastAPI (its ``app``)."""
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
    limit = int(settings.max_body_bytes)
    app.add_middleware(_Guard, limit=limit, view=view)
    # Ahead of FastAPI, so none of its per-request work is paid (see manager.api.ingest).
    return PublishRoute(app, view=view, tokens=tokens, limiter=app.state.limiter, limit=limit)


def _response(answer: ErrorAnswer) -> Response:
    return Response(
        answer.body(), answer.status, dict(answer.headers), media_type="application/json"
    )


def _install_error_handlers(app: FastAPI) -> None:
    async def answered(request: Request, exc: Exception) -> Response:
        return _response(_unrouted(request, exc) or answer_for(exc) or bug(exc))

    for kind in ANSWERED:
        app.add_exception_handler(kind, answered)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return _response(
                ErrorAnswer(400, "the body is not valid JSON: send a JSON document", problems)
            )
        where = "; ".join(f"{'.'.join(p['loc'])}: {p['message']}" for p in problems)
        return _response(ErrorAnswer(422, f"the request does not fit the API: {where}", problems))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("HTTP API request failed", method=request.method, path=request.url.path)
        return _response(bug(exc))


def _unrouted(request: Request, exc: Exception) -> ErrorAnswer | None:
    """The answer to a request no route takes (Starlette's bare 404 and 405), saying what
    to do, in the API's error shape rather than ``{"detail": "Not Found"}``."""
    if not isinstance(exc, StarletteHTTPException) or exc.detail not in _UNROUTED:
        return None
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return ErrorAnswer(404, f"no such endpoint: {where}; the API is listed at /docs")
    allowed = dict(exc.headers or {}).get("Allow", "")
    return ErrorAnswer(
        405, f"{where} is not allowed: this path takes {allowed or 'other methods'}",
        None, dict(exc.headers or {}),
    )  # fmt: skip


#: What Starlette's router raises for a path or method no route takes.
_UNROUTED = ("Not Found", "Method Not Allowed")


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
        response = _response(
            ErrorAnswer(
                413,
                f"the body is over {self.limit} bytes (api.max_body_bytes): send fewer "
                "events per request",
            )
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
