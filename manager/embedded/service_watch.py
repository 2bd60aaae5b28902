"""Keeping the embedded servers up: a server that dies is started again, with backoff.

The embedded Redis and PostgreSQL are the manager's children like the bots: if one exits
while the manager runs (a crash, an OOM kill), it is restarted on the same data (Redis
replays its AOF), and ``on_restart`` lets the manager put back what lives only in memory
(the bots' ACL users).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from bus.backoff import Backoff
from bus.connection import raise_swallowed_cancel

log = structlog.get_logger("manager.embedded.services")


class Server(Protocol):
    """What the watch needs of an embedded server."""

    async def wait(self) -> int:
        """Wait for the process to exit; its code."""

    async def start(self, timeout: float = ...) -> None:  # noqa: ASYNC109 - as the servers'
        """Start it again."""


async def keep_running(
    name: str,
    server: Server,
    *,
    on_restart: Callable[[], Awaitable[None]] | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Restart ``server`` whenever it exits, until cancelled (cancel before stopping it)."""
    backoff = backoff or Backoff(0.5, 30.0)
    attempt = 0
    while True:
        raise_swallowed_cancel()  # start() pings with redis-py, which can drop a cancel
        code = await server.wait()
        log.error("embedded server exited: restarting it", server=name, code=code)
        while True:
            attempt += 1
            await asyncio.sleep(backoff.delay(attempt))
            try:
                await server.start()
            except Exception as exc:
                log.error("embedded server did not start; retrying", server=name, error=str(exc))
                continue
            break
        log.warning("embedded server running again", server=name, attempts=attempt)
        attempt = 0
        if on_restart is not None:
            try:
                await on_restart()
            except Exception:
                log.exception("after restarting the embedded server", server=name)
