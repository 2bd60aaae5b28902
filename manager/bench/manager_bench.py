"""``multibot bench-manager``: how fast the manager starts, restarts and fails over; its memory.

It runs ``multibot start`` on the checkout's default config (embedded Redis and PostgreSQL,
the example bots) plus an idle bot, in a temporary data directory, as a real process,
listening as systemd would on a private ``NOTIFY_SOCKET``. It measures: start to READY=1
(first start, with initdb, and a second start on the same data), the RSS of the idle
manager and bots, that of the idle bot next to a bare redis-py + uvloop worker's
(:mod:`manager.bench.idle_memory`), the time from SIGKILL of a bot to its replacement
running, from SIGKILL of the active replica of an active/standby bot to the standby
holding the lease, and SIGTERM to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Self

from manager.bench.idle_memory import IDLE_BOT, bare_worker, weigh, write_config
from manager.config import DEFAULT_CONFIG_PATH
from manager.control import ControlError, call
from manager.embedded.child_process import child_setup
from manager.errors import ManagerError
from manager.status import InstanceState, InstanceStatus, ManagerStatus, Role

POLL = 0.01  # seconds between status polls while timing
READY_TIMEOUT = 300.0  # seconds the measured manager may take to send READY=1


class ManagerExitedError(ManagerError):
    """The measured ``multibot start`` exited before it sent READY=1 (its log says why)."""


class ManagerRun:
    """One ``multibot start`` process and its notify socket, on ``config``; ``env`` adds to
    its environment (``MULTIBOT_...`` settings for the run).

    Use it as ``async with ManagerRun(work) as run:``: leaving the block, however it is
    left, SIGKILLs the process if it still runs and closes the socket.
    """

    def __init__(
        self, work: Path, env: Mapping[str, str] | None = None, config: Path = DEFAULT_CONFIG_PATH
    ) -> None:
        self.work = work
        self.config = config
        # Its bots run as the tool's own user: it measures the manager, not the isolation,
        # and its bots write into the run's directory (the soak's records).
        self.env = {"MULTIBOT_SUPERVISOR__BOT_USER": "", **(env or {})}
        self.data_dir = work / "data"
        self.socket_path = work / "notify.sock"
        self.log_path = work / "manager.log"
        self.process: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<ManagerRun work={self.work} pid={pid} listening={self.listening}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()

    @property
    def listening(self) -> bool:
        """Whether the notify socket is open."""
        return self._sock is not None

    async def start(self) -> float:
        """Spawn it; seconds until it sent READY=1. :class:`ManagerExitedError` if it exits
        first, :class:`TimeoutError` after :data:`READY_TIMEOUT`; on any failure (and on
        cancellation) the process is killed and the socket closed."""
        if self.process is not None:
            raise ManagerError(f"{self!r} was already started: use a new ManagerRun")
        try:
            return await self._start()
        except BaseException:
            await self.kill()
            raise

    async def _start(self) -> float:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._sock.bind(str(self.socket_path))
        self._sock.setblocking(False)
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.socket_path),
            "MULTIBOT_DATA_DIR": str(self.data_dir),
            "MULTIBOT_API__PORT": "0",  # the API on: measured as run, clashing with nothing
            **self.env,
        }
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "manager.cli", "start", "--config", str(self.config),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=child_setup(),  # a bench killed takes its manager along
            )  # fmt: skip
        # READY=1 or the exit, whichever comes first: a manager that fails to start exits.
        ready = asyncio.ensure_future(self._ready(self._sock))
        exited = asyncio.ensure_future(self.process.wait())
        try:
            await asyncio.wait((ready, exited), timeout=READY_TIMEOUT, return_when=FIRST_COMPLETED)
        finally:
            for waiter in (ready, exited):
                waiter.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if ready.done() and not ready.cancelled():
            ready.result()  # an OSError of the socket, if any
            return time.monotonic() - started
        if exited.done() and not exited.cancelled():
            raise ManagerExitedError(
                f"`multibot start` exited with code {exited.result()} before READY=1"
            )
        raise TimeoutError(f"no READY=1 from `multibot start` within {READY_TIMEOUT:g}s")

    @staticmethod
    async def _ready(sock: socket.socket) -> None:
        """Until READY=1 arrives on ``sock``."""
        loop = asyncio.get_running_loop()
        while b"READY=1" not in await loop.sock_recv(sock, 4096):
            pass

    @property
    def control_socket(self) -> Path:
        """Its control socket (``multibot status`` and the other commands)."""
        return self.data_dir / "manager.sock"

    async def status(self) -> ManagerStatus:
        """The status document."""
        answer = await call(self.control_socket, "status", timeout=10)
        return ManagerStatus.model_validate(answer)

    async def stop(self) -> float:
        """SIGTERM; seconds until it exited. The socket is closed in any case."""
        assert self.process is not None
        try:
            started = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 120)
            return time.monotonic() - started
        finally:
            self._close()

    async def kill(self) -> None:
        """SIGKILL it if it still runs and close the socket (after a failure; idempotent)."""
        self._close()  # first: nothing below may keep it open, not even a cancellation
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()


def _instances(status: ManagerStatus, bot_id: str) -> list[InstanceStatus]:
    return status.bot(bot_id).instances


def _pid(status: ManagerStatus, bot_id: str) -> int:
    """The process of the bot's first instance; ManagerError if it has none running."""
    pid = _instances(status, bot_id)[0].pid
    if pid is None:
        raise ManagerError(f"{bot_id} has no process running")
    return pid


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> float:  # noqa: ASYNC109
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise ManagerError(f"the manager did not get there within {timeout:g}s")
        await asyncio.sleep(POLL)
    return time.monotonic() - started


#: The instances killed in turn: each one's first restart waits only the base backoff.
VICTIMS = (("greeter", 0), ("matcher", 0), ("matcher", 1))


async def _restart_time(manager: ManagerRun, bot_id: str, index: int) -> float:
    """SIGKILL one instance; seconds until a new process of it is running."""
    old = _instances(await manager.status(), bot_id)[index].pid
    if old is None:
        raise ManagerError(f"{bot_id}[{index}] has no process to kill")
    os.kill(old, signal.SIGKILL)

    async def replaced() -> bool:
        row = _instances(await manager.status(), bot_id)[index]
        return row.pid not in (None, old) and row.state is InstanceState.RUNNING

    return await _until(replaced)


async def _failover_time(manager: ManagerRun, bot_id: str) -> float:
    """SIGKILL the active replica; seconds until another replica is active."""
    rows = _instances(await manager.status(), bot_id)
    active = next(r for r in rows if r.role is Role.ACTIVE)
    if active.pid is None:
        raise ManagerError(f"the active replica of {bot_id} has no process")
    os.kill(active.pid, signal.SIGKILL)

    async def taken_over() -> bool:
        rows = _instances(await manager.status(), bot_id)
        return any(r.role is Role.ACTIVE and r.instance != active.instance for r in rows)

    took = await _until(taken_over)

    async def settled() -> bool:  # the killed one back as standby before the next round
        roles = [r.role for r in _instances(await manager.status(), bot_id)]
        return sorted(map(str, roles)) == [Role.ACTIVE, Role.STANDBY]

    await _until(settled)
    return took


async def run_manager_bench(rounds: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Measure; the results as a JSON-able dict (``echo`` reports progress). When the
    manager fails, the error names its log, which is kept; else the run's files go."""
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-"))
    os.chmod(work, 0o711)  # as root, the embedded PostgreSQL runs as another user
    keep = False
    try:
        config = write_config(work)
        async with ManagerRun(work, config=config) as manager:
            echo("starting the manager (first start: initdb) ...")
            cold = await manager.start()
            echo(f"READY after {cold:.2f}s; idling 5 s (and a bare worker) before measuring memory")
            found = await call(manager.control_socket, "connection", timeout=10)
            async with bare_worker(found["redis_url"], found["namespace"]) as bare_pid:
                await asyncio.sleep(5)
                status = await manager.status()
                idle = await weigh(_pid(status, IDLE_BOT), bare_pid)
            examples = [b for b in status.bots if b.id != IDLE_BOT]
            bot_rss = [i.rss for b in examples for i in b.instances if i.rss]
            restarts, failovers = [], []
            for n in range(rounds):
                echo(f"round {n + 1}/{rounds}: kill -9 a bot, then the active replica")
                restarts.append(await _restart_time(manager, *VICTIMS[n % len(VICTIMS)]))
                failovers.append(await _failover_time(manager, "shared-users"))
            stop = await manager.stop()
        echo("second start on the same data ...")
        async with ManagerRun(work, config=config) as manager:
            warm = await manager.start()
            await manager.stop()
    except (ManagerError, ControlError, TimeoutError) as exc:  # all of them the manager's
        keep = True
        raise ManagerError(f"the measured manager failed: {exc}; see {work}/manager.log") from exc
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "ready_first_start_s": round(cold, 3),
        "ready_second_start_s": round(warm, 3),
        "manager_rss_bytes": status.manager.rss,
        "bot_rss_bytes_median": int(statistics.median(bot_rss)),
        "bots": len(bot_rss),
        **idle.as_json(),
        "redis_used_memory_bytes": status.memory.redis if status.memory else None,
        "restart_s": _summary(restarts),
        "failover_s": _summary(failovers),
        "stop_s": round(stop, 3),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }
