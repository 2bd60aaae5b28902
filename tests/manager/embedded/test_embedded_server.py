"""Tests for manager.embedded.server: the process handling Redis and PostgreSQL share.

What the server tests cannot easily provoke is run here on a small shell script: a server
that never gets ready, one that ignores SIGTERM and leaves a child behind, a noisy log.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from manager.embedded.child_process import child_setup
from manager.embedded.server import EmbeddedServer
from manager.errors import EmbeddedServiceError
from tests.postgres_fixtures import gone
from tests.support import wait_until

#: A stand-in server: prints ``lines`` log lines, starts a child if asked (one that outlives
#: the script), writes its own pid to ``ready`` unless told not to, then sleeps until stopped.
SCRIPT = """
i=0; while [ "$i" -lt "$LINES" ]; do echo "line $i"; i=$((i + 1)); done
[ "$CHILD" = yes ] && { sleep 60 & echo $! > child.pid; }
[ "$READY" = yes ] && echo $$ > ready
exec sleep 60
"""


@dataclass(frozen=True)
class Shell:
    """The binary the stand-in runs."""

    path: Path = Path("/bin/sh")
    version_str: str = "1.0"

    def __str__(self) -> str:
        return f"sh ({self.path})"


class ScriptServer(EmbeddedServer[Shell]):
    """A server whose readiness is the ``ready`` file naming its pid."""

    _event = "script_server"
    _chdir = True  # the script writes its files into data_dir

    def __init__(
        self,
        data_dir: Path,
        *,
        lines: int = 1,
        ready: bool = True,
        child: bool = False,
        ignore_term: bool = False,
    ) -> None:
        super().__init__(data_dir, binary=None, port=None, unix_socket=True, log_name="out.log")
        self._lines = lines
        self._ready_flag = ready
        self._child = child
        self._ignore_term = ignore_term

    @property
    def socket_path(self) -> Path:
        return self._data_dir / "none.sock"

    @property
    def child_pid(self) -> int:
        """The pid of the child the script started."""
        return int((self._data_dir / "child.pid").read_text())

    def _find_binary(self) -> Shell:
        return Shell()

    async def _prepare(self, binary: Shell, deadline: float, log_offset: int) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        (self._data_dir / "ready").unlink(missing_ok=True)

    def _command(self, binary: Shell) -> list[str | Path]:
        trap = "trap '' TERM; " if self._ignore_term else ""  # exec keeps ignoring it
        flags = f"LINES={self._lines} READY={_yes(self._ready_flag)} CHILD={_yes(self._child)}"
        return [binary.path, "-c", f"{flags}; {trap}{SCRIPT}"]

    def _child_setup(self) -> Callable[[], None]:
        return child_setup()

    async def _ready(self, pid: int, time_left: float) -> bool:
        try:
            return (self._data_dir / "ready").read_text().strip() == str(pid)
        except OSError:
            return False

    def _files(self) -> str:
        return f"dir {self._data_dir}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


class TestStart:
    async def test_never_ready_fails_at_the_deadline_and_leaves_nothing(
        self, tmp_path: Path
    ) -> None:
        """A server not ready by the deadline is killed, with its child, and start() says so."""
        server = ScriptServer(tmp_path, ready=False, child=True)
        with pytest.raises(EmbeddedServiceError, match="did not become ready in time") as info:
            await server.start(timeout=0.5)
        assert str(info.value).endswith(f"(dir {tmp_path}); its log says:\nline 0")
        assert not server.running
        # SIGKILLed, the child is gone once the kernel is done with it (a moment, at most)
        await wait_until(lambda: gone(server.child_pid), 5, "the server's child to be gone")

    async def test_error_quotes_the_last_lines_of_this_start_only(self, tmp_path: Path) -> None:
        """The log tail in an error holds this start's last 20 lines, not an earlier run's."""
        async with ScriptServer(tmp_path, lines=3):
            pass
        server = ScriptServer(tmp_path, lines=30, ready=False)
        with pytest.raises(EmbeddedServiceError) as info:
            await server.start(timeout=0.5)
        tail = str(info.value).split("its log says:\n", 1)[1].splitlines()
        assert tail == [f"line {i}" for i in range(10, 30)]

    async def test_wait_returns_the_exit_code_of_a_crash(self, tmp_path: Path) -> None:
        """wait() returns when the server dies; on a stopped server it raises."""
        server = ScriptServer(tmp_path)
        with pytest.raises(EmbeddedServiceError, match="is not running"):
            await server.wait()
        async with server:
            assert server.pid is not None
            psutil.Process(server.pid).send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(server.wait(), 5) == -signal.SIGKILL
            assert not server.running

    def test_repr_before_start(self, tmp_path: Path) -> None:
        """repr shows an unknown version and the stopped state before the first start."""
        assert repr(ScriptServer(tmp_path)) == (
            f"<ScriptServer ? socket={tmp_path / 'none.sock'} stopped>"
        )


class TestStop:
    async def test_sigterm_ends_a_server_by_default(self, tmp_path: Path) -> None:
        """Without a graceful shutdown of its own, stop() sends SIGTERM and the server exits."""
        server = ScriptServer(tmp_path)
        await server.start()
        with capture_logs() as logs:
            await server.stop(timeout=5)
        assert [entry["event"] for entry in logs] == ["script_server.stopped"]
        assert logs[0]["code"] == -signal.SIGTERM

    async def test_kills_the_process_group_after_the_grace(self, tmp_path: Path) -> None:
        """A server ignoring SIGTERM is SIGKILLed after the grace, and so is its child."""
        server = ScriptServer(tmp_path, child=True, ignore_term=True)
        await server.start()
        pid = server.pid
        assert pid is not None
        with capture_logs() as logs:
            await server.stop(timeout=0.2)
        assert [entry["event"] for entry in logs] == [
            "script_server.stop_timeout",
            "script_server.stopped",
        ]
        assert gone(pid)  # reaped by stop()
        # SIGKILLed with its group, the child is gone once the kernel is done with it
        await wait_until(lambda: gone(server.child_pid), 5, "the server's child to be gone")
