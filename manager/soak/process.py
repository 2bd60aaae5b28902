"""The manager under test: ``multibot start`` on the soak's config, killed and started again.

:class:`~manager.bench.manager_bench.ManagerRun` always starts the checkout's default
config; :class:`SoakManager` is the same process with the soak's config file instead
(``ManagerRun`` takes no config path, so this overrides its spawn step only).

:class:`ManagerKeeper` plays systemd's part for the unit in ``systemd/multibot.service``:
it restarts the manager when it exits on its own (``Restart=on-failure``), counting each such
exit as *unexpected*, and on a soak-caused ``kill -9`` it SIGKILLs what is left of the
manager's process tree (``KillMode=mixed``: the rest of the cgroup is killed once the main
process is gone), collected with psutil just before the kill, then starts it again on the
same data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from manager.bench.manager_bench import READY_TIMEOUT, ManagerExitedError, ManagerRun
from manager.control import call
from manager.embedded.child_process import child_setup
from manager.errors import ManagerError

log = structlog.get_logger("manager.soak")


class SoakManager(ManagerRun):
    """``multibot start --config <config>`` in ``work`` (data under ``work/data``)."""

    def __init__(self, work: Path, config: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__(work, env)
        self.config = config

    async def _start(self) -> float:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock = sock
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        sock.bind(str(self.socket_path))
        sock.setblocking(False)
        env = dict(os.environ)
        env.update(NOTIFY_SOCKET=str(self.socket_path), MULTIBOT_DATA_DIR=str(self.data_dir))
        env.update(MULTIBOT_API__PORT="0", **self.env)
        begun = time.monotonic()
        with self.log_path.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "manager.cli", "start", "--config", str(self.config),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=child_setup(),  # a soak killed takes its manager along
            )  # fmt: skip
        self.process = process
        async with asyncio.TaskGroup() as tg:
            ready = tg.create_task(self._ready(sock))
            exit_code = tg.create_task(process.wait())
            done, _ = await asyncio.wait(
                (ready, exit_code), timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED"
            )
            ready.cancel()
            exit_code.cancel()
        if ready in done:
            return time.monotonic() - begun
        if exit_code in done:
            raise ManagerExitedError(
                f"`multibot start` exited with code {process.returncode} before READY=1"
            )
        raise TimeoutError(f"no READY=1 from `multibot start` within {READY_TIMEOUT:g}s")


@dataclass
class ManagerKeeper:
    """Keeps one manager running through the soak, as systemd would (see the module doc)."""

    work: Path
    config: Path
    #: Exits the soak did not cause: (wall time, exit code).
    unexpected_exits: list[tuple[float, int | None]] = field(default_factory=list)
    #: Soak-caused kills: (wall time of the kill, seconds until READY=1 again).
    kills: list[tuple[float, float]] = field(default_factory=list)
    manager: SoakManager | None = None
    _expected: bool = False
    _restarted: asyncio.Event = field(default_factory=asyncio.Event)

    def __repr__(self) -> str:
        exits = len(self.unexpected_exits)
        return f"<ManagerKeeper pid={self.pid} kills={len(self.kills)} unexpected={exits}>"

    @property
    def pid(self) -> int | None:
        """The running manager's pid."""
        process = self.manager.process if self.manager is not None else None
        return process.pid if process is not None and process.returncode is None else None

    @property
    def control_socket(self) -> Path:
        """The manager's control socket."""
        return self.work / "data" / "manager.sock"

    async def start(self) -> float:
        """Start a manager; seconds to READY=1 (:class:`ManagerError` naming the log if not)."""
        self.manager = SoakManager(self.work, self.config)
        try:
            return await self.manager.start()
        except (ManagerError, TimeoutError) as exc:
            raise ManagerError(
                f"the manager did not start: {exc}; its log is {self.manager.log_path}"
            ) from exc

    async def connection(self) -> dict[str, Any]:
        """Where its Redis and PostgreSQL are (the control socket's ``connection`` answer)."""
        found: dict[str, Any] = await call(self.control_socket, "connection", timeout=10)
        return found

    async def watch(self) -> None:
        """Until cancelled: restart the manager whenever it exits without the soak killing it."""
        while True:
            manager = self.manager
            assert manager is not None
            assert manager.process is not None
            code = await manager.process.wait()
            if self._expected:
                await self._restarted.wait()  # kill_and_restart() starts the next one
                self._restarted.clear()
                continue
            self.unexpected_exits.append((time.time(), code))
            log.error("the manager exited on its own: starting it again", code=code)
            await manager.kill()
            await self.start()

    async def kill_and_restart(self) -> tuple[float, list[int]]:
        """SIGKILL the manager and what remains of its tree, start it again; when the last of
        them was dead, and their pids."""
        manager = self.manager
        assert manager is not None
        assert manager.process is not None
        root = psutil.Process(manager.process.pid)
        tree = root.children(recursive=True)
        self._expected = True
        killed_at = time.time()
        try:
            root.send_signal(signal.SIGKILL)
            await manager.process.wait()
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(signal.SIGKILL)
            await asyncio.to_thread(psutil.wait_procs, tree, timeout=10)
            dead_at = time.time()
            await manager.kill()
            took = await self.start()
        finally:
            self._expected = False
            self._restarted.set()
        self.kills.append((killed_at, took))
        return dead_at, [root.pid, *(p.pid for p in tree)]

    async def stop(self) -> None:
        """SIGTERM the manager and wait for it (SIGKILL if it does not stop)."""
        self._expected = True
        if self.manager is not None and self.pid is not None:
            try:
                await self.manager.stop()
            finally:
                await self.manager.kill()
