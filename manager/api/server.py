"""The HTTP API served by uvicorn inside the manager's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import structlog
import uvicorn
from starlette.types import ASGIApp

from manager.errors import ManagerError

log = structlog.get_logger("manager.api")
_STOP_GRACE = 5  # seconds open requests get at shutdown


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: the manager owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    """Binds at :meth:`start` (a port in use is a clear :class:`ManagerError`), serves
    until :meth:`stop`."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._beside: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        """Where it listens (the real port when 0 was asked for)."""
        if self._socket is None:
            return f"http://{self._host}:{self._port}"
        host, port = self._socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> None:
        try:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            self._socket = socket.create_server(
                (self._host, self._port), family=family, backlog=512
            )
        except OSError as exc:
            raise ManagerError(
                f"the HTTP API cannot listen on {self._host}:{self._port} ({exc.strerror}): "
                "stop what uses it, or set api.port (MULTIBOT_API__PORT), or api.enabled = "
                "false"
            ) from None
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        config = uvicorn.Config(
            self._app,
            loop="none",  # the manager's own (uvloop)
            http="httptools",  # uvicorn's fast parser, not the pure-Python h11
            interface="asgi3",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=True,
            timeout_graceful_shutdown=_STOP_GRACE,
            limit_concurrency=1000,
        )
        self._server = _InLoopServer(config)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._socket]), name="http-api"
        )
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise ManagerError("the HTTP API stopped while starting: see the log above")
            await asyncio.sleep(0.01)
        log.info("HTTP API listening", url=self.url)

    def run_beside(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (the status history's sampling) while serving; cancelled at stop."""
        self._beside.append(asyncio.get_running_loop().create_task(work))

    async def stop(self) -> None:
        for task in self._beside:
            task.cancel()
        await asyncio.gather(*self._beside, return_exceptions=True)
        self._beside = []
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _STOP_GRACE + 2)
        except TimeoutError:
            self._task.cancel()
        except Exception as exc:
            log.warning("HTTP API stopped with an error", error=str(exc))
        if self._socket is not None:
            self._socket.close()
