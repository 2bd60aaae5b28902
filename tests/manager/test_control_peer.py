"""Tests for manager.control_peer through a real control server: who gets an answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from manager.control import ControlServer, call
from manager.embedded.child_process import OsUser, switch_user
from tests.support import wait_until

SECRET = "redis://:admin-password@127.0.0.1:6379/0"

#: A client as a bot would write it: ``python -c CLIENT MODE SOCKET``, which waits for a line
#: on stdin, then asks for ``connection`` itself (``self``), from a child (``child``), or
#: from a grandchild that its parent left behind (``orphan``), and prints the answer.
CLIENT = r"""
import json, os, socket, subprocess, sys, time

def ask(path):
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b'{"command": "connection"}\n')
            return sock.makefile("rb").readline().decode().strip()
    except OSError as exc:
        return type(exc).__name__

mode, path = sys.argv[1], sys.argv[2]
sys.stdin.readline()
if mode == "self":
    print(ask(path), flush=True)
elif mode == "child":
    print(subprocess.run([sys.executable, "-c", sys.argv[3], "self", path, sys.argv[3]],
                         input="go\n", capture_output=True, text=True).stdout, end="", flush=True)
elif mode == "orphan":
    middle = os.fork()
    if middle == 0:
        me = os.getpid()
        if os.fork() == 0:
            deadline = time.monotonic() + 10
            while os.getppid() == me and time.monotonic() < deadline:
                time.sleep(0.01)  # until the middle process is gone: an orphan
            print(ask(path), flush=True)
        os._exit(0)
    os.waitpid(middle, 0)
    sys.stdin.readline()  # stay alive (the bot) until the test is done
"""


async def _secret(_: Mapping[str, Any]) -> str:
    return SECRET


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any OS user may pass through (pytest's tmp_path is root's only)."""
    directory = Path(tempfile.mkdtemp(prefix="multibot-control-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def nobody() -> OsUser:
    """The ``nobody`` OS user, for a process of another user (needs root to switch)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another OS user")
    try:
        return OsUser.named("nobody")
    except KeyError:
        pytest.skip("needs an OS user named nobody")


@pytest.fixture
async def server(open_dir: Path) -> AsyncIterator[tuple[ControlServer, set[int]]]:
    """A control server answering ``connection`` with a secret; the set holds the pids it
    takes for bots."""
    bots: set[int] = set()
    path = open_dir / "manager.sock"
    control = ControlServer(path, {"connection": _secret}, is_bot=bots.__contains__)
    await control.start()
    try:
        yield control, bots
    finally:
        await control.close()


def _ask_raw(path: Path) -> str:
    """Ask for ``connection`` with a plain socket: the answer line, or the error's name."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b'{"command": "connection"}\n')
            return sock.makefile("rb").readline().decode().strip()
    except OSError as exc:
        return type(exc).__name__


async def _as_user(user: OsUser, path: Path) -> str:
    """:func:`_ask_raw` from a forked child that switched to ``user``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no event loop, no exceptions out of here
        try:
            os.close(read)
            switch_user(user)
            result = _ask_raw(path)
        except BaseException as exc:  # reported to the parent
            result = f"child failed: {exc!r}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)

    def collect() -> str:
        with os.fdopen(read, "rb") as out:
            answer = out.read().decode()
        os.waitpid(pid, 0)
        return answer

    return await asyncio.to_thread(collect)  # the server answers meanwhile


def _refusals(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "control connection refused"]


class TestOtherUsers:
    async def test_refused_by_the_socket_mode_and_by_the_server(
        self, server: tuple[ControlServer, set[int]], nobody: OsUser
    ) -> None:
        """Another user cannot open the 0600 socket; with its mode opened, the server still
        refuses it by uid and logs who it was."""
        control, _ = server
        assert stat.S_IMODE(control.path.stat().st_mode) == 0o600
        assert await _as_user(nobody, control.path) == "PermissionError"
        control.path.chmod(0o666)  # the first layer gone
        with capture_logs() as logs:
            answer = json.loads(await _as_user(nobody, control.path))
        assert answer["ok"] is False
        assert f"uid {nobody.uid}" in answer["error"] and "root" in answer["error"]
        assert SECRET not in json.dumps(answer)
        (refusal,) = _refusals(logs)
        assert refusal["peer_uid"] == nobody.uid and refusal["log_level"] == "warning"
        assert isinstance(refusal["peer_pid"], int)


class TestBots:
    async def _client(
        self, control: ControlServer, bots: set[int], mode: str, *, bot: bool
    ) -> dict[str, Any]:
        """Run CLIENT in ``mode`` in its own session, as the supervisor runs a bot (taken
        for one if ``bot``); its answer."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, mode, str(control.path), CLIENT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert process.stdin is not None and process.stdout is not None
        if bot:
            bots.add(process.pid)
        try:
            process.stdin.write(b"go\n")
            line = await asyncio.wait_for(process.stdout.readline(), 20)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already
                process.kill()
            await process.wait()
        answer: dict[str, Any] = json.loads(line)
        return answer

    @pytest.mark.parametrize("mode", ["self", "child", "orphan"])
    async def test_a_bot_and_what_it_starts_are_refused(
        self, server: tuple[ControlServer, set[int]], mode: str
    ) -> None:
        """A bot process, its child, and a grandchild orphaned into its session: refused,
        though they run as the manager's own user."""
        control, bots = server
        answer = await self._client(control, bots, mode, bot=True)
        assert answer["ok"] is False
        assert "is a bot or was started by one" in answer["error"]
        assert SECRET not in json.dumps(answer)

    async def test_a_process_the_manager_started_is_refused(
        self, server: tuple[ControlServer, set[int]]
    ) -> None:
        """A child of the manager not (yet) recorded as a bot is refused all the same."""
        control, bots = server
        answer = await self._client(control, bots, "self", bot=False)
        assert answer["ok"] is False
        assert "was started by the manager" in answer["error"]

    async def test_the_manager_user_from_outside_is_answered(
        self, server: tuple[ControlServer, set[int]]
    ) -> None:
        """A process of the manager's user that it did not start (the CLI) is answered."""
        control, _ = server
        assert await call(control.path, "connection") == SECRET


def _has_peer_pidfd() -> bool:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        try:
            os.close(left.getsockopt(socket.SOL_SOCKET, 77))
        except OSError:
            return False
    return True


class TestPidReuse:
    @pytest.mark.skipif(not _has_peer_pidfd(), reason="needs SO_PEERPIDFD (Linux 6.5+)")
    async def test_a_peer_gone_before_the_check_is_refused(
        self, server: tuple[ControlServer, set[int]]
    ) -> None:
        """A peer that connected and exited before being checked is refused: its pid may
        name another process by then."""
        control, _ = server
        script = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            's.sendall(b\'{"command": "connection"}\\n\')'
        )
        with capture_logs() as logs:
            # Blocking on purpose: the server's loop accepts only once the peer is gone.
            subprocess.run([sys.executable, "-c", script, str(control.path)], check=True)  # noqa: ASYNC221
            await wait_until(lambda: bool(_refusals(logs)), 10, "the refusal")
        (refusal,) = _refusals(logs)
        assert "exited before it could be checked" in refusal["reason"]
