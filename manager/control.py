"""The control socket: how ``multibot status/stop/restart/maintenance/reload`` reach a manager.

A unix socket in the data directory (mode 0600: only the manager's user may use it), one JSON
request per connection and one JSON answer: ``{"command": "status"}`` →
``{"ok": true, "result": …}`` or ``{"ok": false, "error": "…"}``. Whoever connects is
checked first (:mod:`manager.control_peer`): a process of another user than the manager's
or root, and a bot or anything a bot started, gets only a refusal. This module is the
server; the client (:func:`call`) is in :mod:`manager.control_client`, which the command
line imports without this module's logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from manager.control_client import ControlError, call, control_path
from manager.control_peer import Peer, PeerCheck
from manager.errors import ManagerError

if TYPE_CHECKING:  # the CLI imports this module; the archive's stays unloaded
    from bus.archive.audit_log import Outcome

    #: Told of each write command: the peer, the command, the request, its outcome and
    #: error.
    AuditHook = Callable[
        [Peer | None, str, Mapping[str, Any], Outcome, str | None], Awaitable[None]
    ]

log = structlog.get_logger("manager.control")
Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]
MAX_REQUEST = 64 * 1024
#: Seconds a refused peer has to send its request line (read so that it gets the refusal,
#: not a reset connection).
REFUSED_READ_TIMEOUT = 2.0


class CommandError(Exception):
    """A handler's refusal, sent back to the caller as the error text."""


class ControlServer:
    """Serves commands on ``path`` with ``handlers`` (command name → coroutine).

    ``is_bot(pid)`` says whether ``pid`` is a running bot process: such a peer, and any
    process it started, is refused (as is a peer of another user than ours or root).
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        is_bot: Callable[[int], bool] = lambda pid: False,
        writes: Collection[str] = (),
        audit: AuditHook | None = None,
    ) -> None:
        """``writes``: the commands that change something, each told to ``audit`` with
        the peer that sent it and how it ended."""
        self.path = path
        self._handlers = dict(handlers)
        self._writes = frozenset(writes)
        self._audit = audit
        self._peers = PeerCheck(is_bot)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; a stale socket of a dead manager is replaced, a live one is refused."""
        if self.path.exists():
            try:
                await call(self.path, "ping", timeout=1.0)
            except ControlError:
                self.path.unlink()
            else:
                raise ManagerError(
                    f"another manager is running on {self.path.parent}: stop it "
                    "(`multibot stop`) or give this one another data_dir"
                )
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer, refusal = self._refusal(writer)
            if refusal is None:
                answer = await self._answer(await reader.readline(), peer)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.readline(), REFUSED_READ_TIMEOUT)
                answer = {"ok": False, "error": refusal}
            writer.write(orjson.dumps(answer, default=str) + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _refusal(self, writer: asyncio.StreamWriter) -> tuple[Peer | None, str | None]:
        """The peer on ``writer``, and why it must not be answered (logged), or None."""
        peer, refusal = self._peers.refusal(writer.get_extra_info("socket"))
        if refusal is not None:
            log.warning(
                "control connection refused",
                peer_pid=peer.pid if peer else None,
                peer_uid=peer.uid if peer else None,
                reason=refusal,
            )
        return peer, refusal

    async def _answer(self, line: bytes, peer: Peer | None = None) -> dict[str, Any]:
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            return {"ok": False, "error": "the request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'send {"command": "<name>", ...}'}
        command = request["command"]
        if command == "ping":
            return {"ok": True, "result": "pong"}
        handler = self._handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return {"ok": False, "error": f"unknown command {command!r}; known: {known}"}
        try:
            answer = {"ok": True, "result": await handler(request)}
            outcome: Outcome = "ok"
        except CommandError as exc:
            answer, outcome = {"ok": False, "error": str(exc)}, "refused"
        except Exception as exc:
            log.exception("control command failed", command=command)
            answer, outcome = {"ok": False, "error": f"{command} failed: {exc}"}, "failed"
        if command in self._writes and self._audit is not None:
            await self._audit(peer, command, request, outcome, answer.get("error"))
        return answer


__all__ = ["CommandError", "ControlError", "ControlServer", "call", "control_path"]
