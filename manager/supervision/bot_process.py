"""One bot OS process: spawned with its spec, its status pipe and its output read, stopped.

The process runs ``python -m bots.runtime`` in its own session (so a signal to the manager's
terminal does not reach it, and stopping it can kill its whole process group), as the OS user
its :class:`Launch` names (with that user's primary group, or the one given, and no
supplementary groups), in the manager's working directory. It gets its spec on stdin,
which then stays open for commands; it reports on an inherited pipe. Its stdout and stderr
are read line by line into the manager's log, never left to fill a pipe.
:class:`HangCheck` says when a process that stopped beating (or never began) is hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from bus.supervision import RuntimeSpec, Status, StatusLine, spec_json
from manager.embedded.child_process import OsUser, child_setup
from manager.supervision.restart_policy import ExitStatus

log = structlog.get_logger("manager.bot")
#: Longest output line kept whole; longer ones are logged in pieces.
MAX_LINE = 64 * 1024
_LEVELS = {"debug", "info", "warning", "error", "critical"}
_DROPPED_FIELDS = ("event", "level", "timestamp", "bot_id", "instance", "logger")

StatusCallback = Callable[["BotProcess", StatusLine], None]


@dataclass(frozen=True)
class Launch:
    """What one bot process starts with."""

    spec: RuntimeSpec
    #: Its whole environment (nothing of the manager's is added).
    environment: Mapping[str, str]
    #: The OS user (and group) it runs as; None: the manager's own.
    user: OsUser | None = None


@dataclass(frozen=True, slots=True)
class HangCheck:
    """When a bot process counts as hung. Pure policy: the caller passes the times.

    Until its first heartbeat a process is importing its bot and starting its event loop
    (synchronous work, slow on a loaded machine): it gets ``startup_timeout`` from its
    spawn. From its first beat on, it is hung once silent for ``heartbeat_timeout``.
    """

    heartbeat_timeout: float
    startup_timeout: float

    def reason(self, now: float, *, started_at: float, last_heartbeat: float | None) -> str | None:
        """Why the process is hung at ``now`` (monotonic seconds, like the others), or None.

        ``started_at`` is its spawn; ``last_heartbeat`` its latest beat, None before the first.
        """
        if last_heartbeat is None:
            if now - started_at > self.startup_timeout:
                return f"no first heartbeat within {self.startup_timeout:g}s of start"
            return None
        silent = now - last_heartbeat
        if silent > self.heartbeat_timeout:
            return f"no heartbeat for {silent:.1f}s (timeout {self.heartbeat_timeout:g}s)"
        return None


class BotProcess:
    """One running bot process; the supervisor makes a new one for every (re)start."""

    def __init__(self, launch: Launch, *, on_status: StatusCallback | None = None) -> None:
        self.spec = launch.spec
        self._environment = dict(launch.environment)
        #: The OS user it runs as; None: the manager's own.
        self.user = launch.user
        self._on_status = on_status
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._exit: asyncio.Future[ExitStatus] | None = None
        self._log = log.bind(bot_id=self.spec.bot_id, instance=self.spec.instance)
        #: Monotonic time the process was spawned.
        self.started_at = 0.0
        #: Monotonic times of its first and its latest heartbeat; None until it beats (it
        #: is still importing its bot and starting its event loop).
        self.first_heartbeat_at: float | None = None
        self.last_heartbeat: float | None = None
        #: The pid it was spawned with (kept after it exited).
        self.spawned_pid: int | None = None
        #: Wall-clock start time (for status).
        self.started_wall = 0.0
        #: Whether it said ``ready`` (consuming) or ``standby`` (waiting for the lease).
        self.ready = False
        self.standby = False
        #: Its fencing token once it took the lease.
        self.active_token: int | None = None
        #: The last error it logged (event and error text), for the reason of a failure.
        self.last_error: str | None = None
        #: Entries its handlers are running on: (stream, entry id) → handlers running.
        self.inflight: Counter[tuple[str, str]] = Counter()
        #: Its last bus metrics snapshot (``m`` line), cumulative since it started.
        self.metrics: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def exited(self) -> bool:
        """Whether it was started and has exited."""
        return self._exit is not None and self._exit.done()

    async def start(self) -> None:
        """Spawn the process and hand it its spec; returns at once (it starts in the background)."""
        read_fd, write_fd = os.pipe()
        spec = self.spec.model_copy(update={"status_fd": write_fd, "manager_pid": os.getpid()})
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bots.runtime",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=self._environment,
                start_new_session=True,
                # Becomes its OS user (uvloop refuses user=, group= and extra_groups=, so
                # the switch is done here), then dies with the manager.
                preexec_fn=child_setup(self.user),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.spawned_pid = self._process.pid
        self._log = self._log.bind(pid=self._process.pid)
        process = self._process
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdin.write(spec_json(spec) + b"\n")
        status = await _pipe_reader(read_fd)
        self._readers = [
            asyncio.create_task(self._read_status(status)),
            asyncio.create_task(self._read_output(process.stdout, "stdout")),
            asyncio.create_task(self._read_output(process.stderr, "stderr")),
        ]
        self._exit = asyncio.ensure_future(self._wait())

    async def _wait(self) -> ExitStatus:
        assert self._process is not None
        returncode = await self._process.wait()
        # Read what it wrote before dying (its last in-flight report matters most).
        await asyncio.wait(self._readers, timeout=2.0)
        for task in self._readers:
            task.cancel()
        return ExitStatus.from_returncode(returncode)

    async def wait(self) -> ExitStatus:
        """Wait for the process to exit; how it ended."""
        if self._exit is None:
            raise RuntimeError("the process was not started")
        return await asyncio.shield(self._exit)

    def command(self, line: str) -> None:
        """Send a command line to the runtime on its stdin (ignored if it is gone)."""
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(line.encode() + b"\n")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (not its group)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the process and its whole process group."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    async def stop(self, timeout: float) -> ExitStatus:  # noqa: ASYNC109 - grace, then SIGKILL
        """SIGTERM (the runtime finishes in-flight events), wait ``timeout``, then SIGKILL."""
        if self._exit is None:
            raise RuntimeError("the process was not started")
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            self._log.warning("bot did not stop in time: killing it", timeout=timeout)
            self.kill()
            return await asyncio.shield(self._exit)

    # -- reading -------------------------------------------------------------------------

    async def _read_status(self, reader: asyncio.StreamReader) -> None:
        while line := await _readline(reader):
            parsed = StatusLine.parse(line)
            if parsed is None:
                continue
            self._apply(parsed)
            if self._on_status is not None:
                self._on_status(self, parsed)

    def _apply(self, line: StatusLine) -> None:
        match line.kind:
            case Status.HEARTBEAT:
                now = time.monotonic()
                if self.first_heartbeat_at is None:
                    self.first_heartbeat_at = now
                    self._log.debug("first heartbeat", startup_s=round(now - self.started_at, 2))
                self.last_heartbeat = now
            case Status.READY:
                self.ready = True
            case Status.STANDBY:
                self.standby = True
            case Status.ACTIVE:
                self.standby = False
                self.active_token = line.token
            case Status.STARTED:
                self.inflight.update((line.stream, i) for i in line.entry_ids)
            case Status.FINISHED:
                self.inflight.subtract((line.stream, i) for i in line.entry_ids)
                self.inflight += Counter()  # drops zero counts
            case Status.METRICS:
                self.metrics = line.data

    async def _read_output(self, reader: asyncio.StreamReader, stream: str) -> None:
        while line := await _readline(reader):
            self._log_line(line.decode(errors="replace").rstrip("\n"), stream)

    def _log_line(self, text: str, stream: str) -> None:
        """Re-log a structured line of the bot with its own fields, anything else as text."""
        if text.startswith("{"):
            try:
                fields: Any = orjson.loads(text)
            except orjson.JSONDecodeError:
                fields = None
            if isinstance(fields, dict) and isinstance(fields.get("event"), str):
                level = str(fields.get("level", "info")).lower()
                extra = {f"bot_{k}" if k in _RESERVED else k: v for k, v in fields.items()}
                for key in _DROPPED_FIELDS:
                    extra.pop(key, None)
                if level in ("error", "critical"):
                    detail = fields.get("error")
                    self.last_error = f"{fields['event']}: {detail}" if detail else fields["event"]
                log_at = getattr(self._log, level if level in _LEVELS else "info")
                log_at(fields["event"], source="bot", **extra)
                return
        if text:
            self._log.info(text, source=stream)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.pid else "exited" if self.exited else "not started"
        return f"<BotProcess {self.spec.bot_id}-{self.spec.instance} {state}>"


_RESERVED = {"pid", "source"}


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    """A StreamReader over the read end of a pipe."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    # Wrapping an fd does no blocking I/O; the transport owns and closes the file.
    pipe = open(fd, "rb", 0)  # noqa: SIM115, ASYNC230
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


async def _readline(reader: asyncio.StreamReader) -> bytes:
    """The next line; an over-long line comes back in MAX_LINE pieces instead of failing."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError as exc:
        return await reader.readexactly(exc.consumed)
