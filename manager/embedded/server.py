"""A private server run as a child process: what the embedded Redis and PostgreSQL share.

``EmbeddedServer`` owns the process. It finds the binaries if none were given, spawns the
server in its own process group and tied to us, polls it until it is ready or a deadline
passes, and stops it: the server's own graceful shutdown, a bounded wait, then SIGKILL of the
group. Errors quote the tail of the server's log. A subclass supplies what differs: the files
it prepares, the command line, the readiness probe, the graceful shutdown and its URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, ClassVar, Generic, Protocol, Self, TypeVar

import structlog

from manager.errors import EmbeddedServiceError

log = structlog.get_logger(__name__)

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_READY_POLL = 0.005  # seconds between readiness checks while the server boots
_LOG_TAIL_LINES = 20


class Binary(Protocol):
    """What a server needs of its binaries: a version to log and show (and ``str`` for errors)."""

    @property
    def version_str(self) -> str:
        """The version, dotted."""
        ...


B = TypeVar("B", bound=Binary)


#: How many ports a start picks before giving up when each was taken meanwhile, and what
#: the servers (redis-server, postgres) log then.
_BIND_TRIES = 3
_PORT_TAKEN = "Address already in use"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the server and every process it forked)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


class EmbeddedServer(ABC, Generic[B]):
    """One private server child process with its files in ``data_dir``.

    The constructor only records options. ``start()`` finds the binaries if none were given,
    lets the subclass prepare its files, spawns the server and waits until it is ready; the
    port a subclass picks (``_pick_port``) is kept across restarts. The process runs in its
    own session, so a Ctrl-C to us does not reach it, and dies with us (``child_setup``).
    """

    #: Prefix of the logged events: ``<prefix>.started``, ``.stopped``, ``.stop_timeout``,
    #: ``.killed``.
    _event: ClassVar[str]
    #: Whether children run with data_dir as their working directory.
    _chdir: ClassVar[bool] = False

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: B | None,
        port: int | None,
        unix_socket: bool,
        log_name: str,
    ) -> None:
        self._data_dir = Path(data_dir).absolute()
        self._binary = binary
        self._port = port
        self._unix_socket = unix_socket
        self._process: asyncio.subprocess.Process | None = None
        #: The server's log: its stdout and stderr, and what it logs there itself.
        self.log_path = self._data_dir / log_name

    # -- what a subclass supplies ------------------------------------------------------------

    @property
    @abstractmethod
    def socket_path(self) -> Path:
        """The unix socket (used only with ``unix_socket=True``)."""

    @abstractmethod
    def _find_binary(self) -> B:
        """Find binaries to run (called in a worker thread, when none were given)."""

    @abstractmethod
    async def _prepare(self, binary: B, deadline: float, log_offset: int) -> None:
        """Get data_dir and the server's files ready for a spawn; raise if they cannot be."""

    @abstractmethod
    def _command(self, binary: B) -> Sequence[str | Path]:
        """The server's command line."""

    @abstractmethod
    def _child_setup(self) -> Callable[[], None]:
        """The ``preexec_fn`` of every child; made by ``child_setup``, so it dies with us."""

    @abstractmethod
    async def _ready(self, pid: int, time_left: float) -> bool:
        """Whether the server with ``pid`` (ours, not another on its address) is ready.

        ``time_left`` is the time to the deadline: a bound for the probe's I/O.
        """

    @abstractmethod
    def _files(self) -> str:
        """Where its setup is, for startup errors: ``config <path>``, say."""

    async def _request_stop(self, process: asyncio.subprocess.Process, grace: float) -> None:
        """Ask the running server to shut down; it has ``grace`` seconds to exit. Here: SIGTERM."""
        with contextlib.suppress(ProcessLookupError):
            process.terminate()

    async def _abandon_start(self) -> None:
        """Get rid of a server that did not become ready. Here: SIGKILL it."""
        await self.kill()

    def _start_details(self) -> dict[str, object]:
        """Fields the ``started`` event carries besides port, pid, version and startup time."""
        return {}

    def _repr_details(self) -> str:
        """Text repr shows after the address (with a leading space)."""
        return ""

    # -- the process -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Directory holding the server's files: its config or cluster, data, log and socket."""
        return self._data_dir

    @property
    def port(self) -> int | None:
        """TCP port; None before the first start, and always when listening on a socket only."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when it is not running."""
        return self._process.pid if self._process and self._process.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (started and not yet exited)."""
        return self.pid is not None

    def _pick_port(self) -> None:
        """Pick a free port unless one was given or the server listens on a socket only."""
        if self._port is None and not self._unix_socket:
            self._port = free_port()

    # ASYNC109: on expiry start() gets rid of the server and raises with its log; a cancel
    # scope can't.
    async def start(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Spawn the server; return once it is ready, else get rid of it and raise.

        ``timeout`` covers the whole start: finding binaries, preparing files, booting.
        """
        if self.running:
            raise EmbeddedServiceError(f"{self!r} is already running: call restart() instead")
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        if self._binary is None:
            self._binary = await asyncio.to_thread(self._find_binary)
        binary = self._binary
        picking = self._port is None  # a port this start picks may be taken meanwhile
        for attempt in range(1, _BIND_TRIES + 1):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            await self._prepare(binary, started_at + timeout, log_offset)
            with self.log_path.open("ab") as logfile:
                self._process = await self._spawn(self._command(binary), logfile)
            try:
                await self._wait_ready(self._process, started_at + timeout, log_offset)
                break
            except EmbeddedServiceError as exc:
                await self._abandon_start()
                if not picking or attempt == _BIND_TRIES or _PORT_TAKEN not in str(exc):
                    raise
                # Free when picked, bound by another process since: pick another.
                log.warning(f"{self._event}.port_taken", port=self._port, attempt=attempt)
                self._port = None
            except BaseException:
                await self._abandon_start()
                raise
        assert self._process is not None  # the loop ends ready, or raises
        log.info(
            f"{self._event}.started",
            port=self._port,
            pid=self._process.pid,
            version=binary.version_str,
            **self._start_details(),
            startup_ms=round((loop.time() - started_at) * 1000, 1),
        )

    async def _spawn(
        self, args: Sequence[str | Path], logfile: IO[bytes]
    ) -> asyncio.subprocess.Process:
        """Run ``args`` in a new session, tied to us, with its output going to ``logfile``."""
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=logfile,  # early errors (a bad config) go here, before a server opens its log
            stderr=logfile,
            cwd=self._data_dir if self._chdir else None,
            start_new_session=True,  # own process group: a Ctrl-C to us does not reach it
            preexec_fn=self._child_setup(),
        )

    async def _wait_ready(
        self, process: asyncio.subprocess.Process, deadline: float, log_offset: int
    ) -> None:
        loop = asyncio.get_running_loop()
        exited = asyncio.create_task(process.wait())
        try:
            while not exited.done() and loop.time() < deadline:
                if await self._ready(process.pid, deadline - loop.time()):
                    return
                # Pause between attempts, but wake at once if the process dies.
                await asyncio.wait({exited}, timeout=_READY_POLL)
        finally:
            exited.cancel()
            await asyncio.wait({exited})
        what = (
            f"exited with code {process.returncode} during startup"
            if process.returncode is not None
            else "did not become ready in time"
        )
        raise EmbeddedServiceError(
            f"{self._binary} {what} ({self._files()}); its log says:\n" + self._log_tail(log_offset)
        )

    def _log_tail(self, offset: int) -> str:
        """The last lines written to the log since ``offset``, for an error message."""
        try:
            with self.log_path.open("rb") as logfile:
                logfile.seek(offset)
                lines = logfile.read().decode(errors="replace").splitlines()
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"

    # ASYNC109: the timeout is a grace period before SIGKILL, not a cancel scope.
    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Shut the server down, wait up to ``timeout`` for it to exit, then SIGKILL its
        process group. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            await self._request_stop(process, timeout)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            log.warning(f"{self._event}.stop_timeout", pid=process.pid, timeout=timeout)
            kill_group(process.pid)
            await process.wait()
        self._process = None
        log.info(
            f"{self._event}.stopped", port=self._port, pid=process.pid, code=process.returncode
        )

    async def kill(self) -> None:
        """SIGKILL the server's process group (a simulated crash) and reap it. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            kill_group(process.pid)
            log.info(f"{self._event}.killed", port=self._port, pid=process.pid)
        await process.wait()
        self._process = None

    async def wait(self) -> int:
        """Wait until the running server exits (a crash, or a stop); its exit code."""
        process = self._process
        if process is None:
            raise EmbeddedServiceError(f"{self!r} is not running")
        return await process.wait()

    async def restart(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (as stop/start)
        """Stop the server if it runs (for up to ``timeout``, at most 10 s), then start it
        again on the same port and data."""
        await self.stop(min(timeout, 10.0))
        await self.start(timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        version = "?" if self._binary is None else self._binary.version_str
        where = f"socket={self.socket_path}" if self._unix_socket else f"port={self._port}"
        state = f"pid={self.pid} running" if self.running else "stopped"
        return f"<{type(self).__name__} {version} {where}{self._repr_details()} {state}>"
