"""A TCP proxy in front of a test's Redis that can lose a reply on its way to the client.

A connection that drops after Redis sent a reply but before the client read it (a network
reset, a NAT timeout, a load balancer closing idle-looking sockets) is a fault no Redis
command can make: Redis has done the work (an XREADGROUP has made its entries pending), the
client never learns of it. :meth:`TcpProxy.lose_next_reply` makes exactly that happen once;
:meth:`TcpProxy.cut_next_request` makes Redis unreachable for one client's next command.
"""

from __future__ import annotations

import asyncio
import time


class TcpProxy:
    """Forwards each client connection to ``host:port``; :meth:`lose_next_reply` arms it to
    drop the next reply to a request holding ``marker`` and close that connection.

    Only replies that carry something are lost (a RESP null, such as an XREADGROUP's
    "nothing arrived within BLOCK", is forwarded), so an armed proxy waits for the reply
    that matters. ``lost`` is set once a reply was dropped.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._marker: bytes | None = None
        self._cut: tuple[bytes, float] | None = None  # (marker, seconds refused after)
        self._refuse_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.lost = asyncio.Event()
        self.port = 0
        self.url = ""

    async def start(self) -> str:
        """Listen on a free port of 127.0.0.1; return the ``redis://`` URL to connect to."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        return self.url

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def lose_next_reply(self, marker: bytes) -> None:
        """Drop the next non-null reply on a connection whose last request held ``marker``
        (a command name, as sent: ``b"XREADGROUP"``), then close that connection."""
        self.lost.clear()
        self._marker = marker

    def cut_next_request(self, marker: bytes, *, refuse_for: float) -> None:
        """Drop the next request holding ``marker`` unsent, close its connection, and close
        every new connection for ``refuse_for`` seconds after (Redis away for the client
        that sent it, longer than its own retries, while other connections go on)."""
        self.lost.clear()
        self._cut = (marker, refuse_for)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            client_w.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [client_w]
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
            writers.append(server_w)
            last_request = [b""]
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._upstream(client_r, server_w, last_request))
                tg.create_task(self._downstream(server_r, client_w, last_request))
        except* (OSError, _Cut):
            pass
        except* asyncio.CancelledError:
            pass  # closed by close(): end quietly (the server logs a handler that raised)
        finally:
            for writer in writers:
                writer.close()
            self._tasks.discard(task)

    async def _upstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, last_request: list[bytes]
    ) -> None:
        while data := await reader.read(65536):
            cut = self._cut
            if cut is not None and cut[0] in data:
                self._cut = None
                self._refuse_until = time.monotonic() + cut[1]
                self.lost.set()
                raise _Cut  # the request never reaches Redis
            last_request[0] = data
            writer.write(data)
            await writer.drain()
        raise _Cut

    async def _downstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, last_request: list[bytes]
    ) -> None:
        while data := await reader.read(65536):
            marker = self._marker
            if (
                marker is not None
                and marker in last_request[0]
                and not data.startswith((b"*-1", b"_", b"$-1"))
            ):
                self._marker = None
                self.lost.set()
                raise _Cut  # the reply never reaches the client
            writer.write(data)
            await writer.drain()
        raise _Cut


class _Cut(Exception):
    """One side of a proxied connection ended (or a reply was dropped): close both."""
