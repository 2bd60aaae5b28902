"""The parent's side of the benchmark's child processes: spawn one, talk to it, close it.

Each child is a fresh interpreter running :mod:`manager.bench.child`; the parent keeps one
end of a socket pair, wrapped as a ``multiprocessing`` connection, and the process.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from manager.bench.child import ENTRY
from manager.bench.options import BenchError, IdleSpec, WorkerSpec
from manager.bench.recording import receive

log = structlog.get_logger("manager.bench")

#: Seconds a child may take to get ready: it imports the bus and connects (2 busy cores
#: are slow).
SPAWN_TIMEOUT = 60.0
#: Seconds a child may take to send its result, and to exit once its connection closed.
STOP_TIMEOUT = 30.0


@dataclass(slots=True)
class Child:
    """A child process and the parent's end of its connection."""

    label: str
    process: asyncio.subprocess.Process
    conn: Connection

    async def expect(self, kind: str, timeout: float) -> Any:  # noqa: ASYNC109 - a deadline
        """The payload of the child's next message, which must be ``kind``."""
        try:
            got, payload = await asyncio.wait_for(receive(self.conn), timeout)
        except TimeoutError:
            raise BenchError(f"{self.label} sent no {kind!r} within {timeout:.0f} s") from None
        except (EOFError, OSError):
            raise BenchError(
                f"{self.label} closed its connection before sending {kind!r}: see its log on stderr"
            ) from None
        if got == "error":
            raise BenchError(f"bench child failed: {payload}")
        if got != kind:
            raise BenchError(f"{self.label} sent {got!r} where {kind!r} was due")
        return payload

    def send(self, kind: str, payload: Any = None) -> None:
        """Send the child a message; a child that is gone is an error of the run."""
        try:
            self.conn.send((kind, payload))
        except OSError:
            raise self._gone(kind) from None

    def check_alive(self) -> None:
        """Raise if the child exited: it only exits after sending its result."""
        if self.process.returncode is not None:
            raise self._gone("the drain")

    def _gone(self, during: str) -> BenchError:
        code = self.process.returncode
        return BenchError(
            f"{self.label} exited{'' if code is None else f' with code {code}'} before "
            f"{during}: see its log on stderr"
        )

    async def close(self) -> None:
        """Wait for the process to exit (bounded), then kill it."""
        self.conn.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("bench child did not exit; killing it", child=self.label)
            self.process.kill()
            await self.process.wait()


async def spawn(job: WorkerSpec | IdleSpec, progress_fd: int | None = None) -> Child:
    """Start a fresh interpreter running ``job`` (see :mod:`manager.bench.child`)."""
    parent_sock, child_sock = socket.socketpair()
    with parent_sock, child_sock:
        fds = [child_sock.fileno()] + ([] if progress_fd is None else [progress_fd])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ENTRY, *map(str, fds),
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=2,  # our stdout may carry the --json line: the child's goes to fd 2
            # A Ctrl-C reaches only us; we close the connections and the children end.
            start_new_session=True,
        )  # fmt: skip
        conn = Connection(parent_sock.detach())
    child = Child(job.label, process, conn)
    child.send("job", job)
    return child


async def expect_all(children: list[Child], kind: str, timeout: float) -> list[Any]:  # noqa: ASYNC109
    """Every child's next message, which must be ``kind``; on the first failure, stop waiting
    for the others (their readers must be gone before the connections are closed)."""
    waits = [asyncio.ensure_future(c.expect(kind, timeout)) for c in children]
    try:
        return list(await asyncio.gather(*waits))
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
