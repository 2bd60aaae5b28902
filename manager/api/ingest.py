"""``POST /v1/events`` on a lean route: plain ASGI in front of FastAPI.

Systems outside the fleet publish through this one call, so its cost per request is the
API's throughput. Served by FastAPI, a publish spent more time in the framework (its
telemetry check, the routing, solving the dependencies, the request object, the exception
middleware) than in validating and publishing. :class:`PublishRoute` answers the call in
front of FastAPI with the same steps and functions as the FastAPI route, which stays
registered to describe it in the OpenAPI document: the body limit (``api.max_body_bytes``)
by Content-Length and as the body streams in, the bearer token, the token's rate limit and
the ``publish`` scope (:func:`manager.api.security.authorize`), the body's validation, the
publish and its audit record (:func:`manager.api.publishing.publish_body`), and every
error as FastAPI's handlers give it (:func:`manager.api.errors.answer_for`). Every other
request goes to FastAPI.
"""

from __future__ import annotations

import orjson
import structlog
from fastapi import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from manager.api.auth import Tokens
from manager.api.coalescer import PublishCoalescer
from manager.api.context import ManagerView
from manager.api.errors import ErrorAnswer, answer_for, bug
from manager.api.publishing import publish_body
from manager.api.ratelimit import RateLimiter
from manager.api.security import authorize, bearer_token

log = structlog.get_logger("manager.api")

#: The route this module serves, and its name in errors and request counts.
PATH = "/v1/events"
_ROUTE = f"POST {PATH}"
_JSON = (b"content-type", b"application/json")
#: Counted for a client that hung up before its body arrived: it gets no answer.
CLIENT_GONE = 499


class ClientGoneError(Exception):
    """The client disconnected before sending its whole body."""


class PublishRoute:
    """The API's ASGI application: answers ``POST /v1/events`` itself and hands every other
    request to ``app`` (FastAPI).

    ``limit``: the largest body accepted (bytes). Requests are counted on ``view`` as the
    FastAPI routes' are (method, route template, status)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        view: ManagerView,
        tokens: Tokens,
        limiter: RateLimiter,
        limit: int,
    ) -> None:
        self.app = app
        self._view = view
        self._tokens = tokens
        self._limiter = limiter
        self._limit = limit
        self._coalescer = PublishCoalescer(view.bus)

    def __repr__(self) -> str:
        return f"<PublishRoute {_ROUTE} limit={self._limit}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or _path(scope) != PATH:
            await self.app(scope, receive, send)
            return
        status = 500
        try:
            status, body, headers = await self._answer(scope, receive)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except ClientGoneError:
            status = CLIENT_GONE
        finally:
            self._view.count_request("POST", PATH, status)

    async def _answer(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The status, body and headers of the answer to one publish."""
        authorization: bytes | None = None
        declared: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:  # the first, as a framework's headers give it
                    authorization = value
            elif name == b"content-length":
                declared = value  # the last, as the body limit always read it
        try:
            if declared is not None and (not declared.isdigit() or int(declared) > self._limit):
                raise self._too_large()
            token = bearer_token(None if authorization is None else authorization.decode("latin-1"))
            caller = authorize(self._tokens, self._limiter, token, _ROUTE, "publish")

            async def body() -> bytes:
                return await self._body(receive)

            ids = await publish_body(self._view, caller, body, self._coalescer.publish_many)
        except ClientGoneError:
            raise
        except Exception as exc:
            return _error(exc, scope)
        answer = orjson.dumps({"ids": ids})
        return 202, answer, [_JSON, (b"content-length", b"%d" % len(answer))]

    def _too_large(self) -> HTTPException:
        return HTTPException(
            413,
            f"the body is over {self._limit} bytes (api.max_body_bytes): send fewer events "
            "per request",
        )

    async def _body(self, receive: Receive) -> bytes:
        """The whole body, refused with 413 once past the limit as it streams in."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _path(scope: Scope) -> str:
    """The request's path within the application (a reverse proxy's prefix taken off)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _error(exc: Exception, scope: Scope) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The answer to a publish that raised ``exc``, as FastAPI's handlers give it."""
    answer: ErrorAnswer | None = answer_for(exc)
    if answer is None:
        log.exception("HTTP API request failed", method=scope["method"], path=scope["path"])
        answer = bug(exc)
    body = answer.body()
    headers: list[tuple[bytes, bytes]] = [_JSON, (b"content-length", b"%d" % len(body))]
    for name, value in answer.headers.items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return answer.status, body, headers
