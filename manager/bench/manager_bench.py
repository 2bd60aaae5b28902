"""``multibot bench-manager``: how fast the manager starts, restarts and fails over; its memory.

It runs ``multibot start`` on the checkout's default config (embedded Redis and PostgreSQL,
the example bots) in a temporary data directory, as a real process, listening as systemd
would on a private ``NOTIFY_SOCKET``. It measures: start to READY=1 (first start, with
initdb, and a second start on the same data), the RSS of the idle manager and bots, the
time from SIGKILL of a bot to its replacement running, from SIGKILL of the active replica
of an active/standby bot to the standby holding the lease, and SIGTERM to exit.
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
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from manager.config import DEFAULT_CONFIG_PATH
from manager.control import ControlError, call
from manager.errors import ManagerError

POLL = 0.01  # seconds between status polls while timing


class ManagerRun:
    """One ``multibot start`` process and its notify socket; ``env`` adds to its environment
    (``MULTIBOT_...`` settings for the run)."""

    def __init__(self, work: Path, env: Mapping[str, str] | None = None) -> None:
        self.work = work
        self.env = dict(env or {})
        self.data_dir = work / "data"
        self.socket_path = work / "notify.sock"
        self.process: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> float:
        """Spawn it; seconds until it sent READY=1."""
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
        with (self.work / "manager.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "manager.cli", "start", "--config", str(DEFAULT_CONFIG_PATH),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        while b"READY=1" not in await asyncio.wait_for(loop.sock_recv(self._sock, 4096), 300):
            pass
        return time.monotonic() - started

    async def status(self) -> dict[str, Any]:
        """The status document."""
        result: dict[str, Any] = await call(self.data_dir / "manager.sock", "status", timeout=10)
        return result

    async def stop(self) -> float:
        """SIGTERM; seconds until it exited."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.process.wait(), 120)
        if self._sock is not None:
            self._sock.close()
        return time.monotonic() - started

    async def kill(self) -> None:
        """SIGKILL it if it still runs (after a failure)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def _instances(status: dict[str, Any], bot_id: str) -> list[dict[str, Any]]:
    return next(b["instances"] for b in status["bots"] if b["id"] == bot_id)


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
    old = _instances(await manager.status(), bot_id)[index]["pid"]
    os.kill(old, signal.SIGKILL)

    async def replaced() -> bool:
        row = _instances(await manager.status(), bot_id)[index]
        return bool(row["pid"] not in (None, old) and row["state"] == "running")

    return await _until(replaced)


async def _failover_time(manager: ManagerRun, bot_id: str) -> float:
    """SIGKILL the active replica; seconds until another replica is active."""
    rows = _instances(await manager.status(), bot_id)
    active = next(r for r in rows if r["role"] == "active")
    os.kill(active["pid"], signal.SIGKILL)

    async def taken_over() -> bool:
        rows = _instances(await manager.status(), bot_id)
        return any(r["role"] == "active" and r["instance"] != active["instance"] for r in rows)

    took = await _until(taken_over)

    async def settled() -> bool:  # the killed one back as standby before the next round
        roles = sorted(str(r["role"]) for r in _instances(await manager.status(), bot_id))
        return roles == ["active", "standby"]

    await _until(settled)
    return took


async def run_manager_bench(rounds: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Measure; the results as a JSON-able dict (``echo`` reports progress)."""
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-"))
    os.chmod(work, 0o711)  # as root, the embedded PostgreSQL runs as another user
    manager = ManagerRun(work)
    done = False
    try:
        echo("starting the manager (first start: initdb) ...")
        cold = await manager.start()
        echo(f"READY after {cold:.2f}s; idling 5 s before measuring memory")
        await asyncio.sleep(5)
        status = await manager.status()
        bot_rss = [i["rss"] for b in status["bots"] for i in b["instances"] if i["rss"]]
        restarts, failovers = [], []
        for n in range(rounds):
            echo(f"round {n + 1}/{rounds}: kill -9 a bot, then the active replica")
            restarts.append(await _restart_time(manager, *VICTIMS[n % len(VICTIMS)]))
            failovers.append(await _failover_time(manager, "shared-users"))
        stop = await manager.stop()
        echo("second start on the same data ...")
        manager = ManagerRun(work)
        warm = await manager.start()
        await manager.stop()
        done = True
        return {
            "ready_first_start_s": round(cold, 3),
            "ready_second_start_s": round(warm, 3),
            "manager_rss_bytes": status["manager"]["rss"],
            "bot_rss_bytes_median": int(statistics.median(bot_rss)),
            "bots": len(bot_rss),
            "redis_used_memory_bytes": status["memory"]["redis"],
            "restart_s": _summary(restarts),
            "failover_s": _summary(failovers),
            "stop_s": round(stop, 3),
        }
    except (ControlError, TimeoutError) as exc:
        raise ManagerError(f"the measured manager failed: {exc}; see {work}/manager.log") from exc
    finally:
        await manager.kill()
        if done:  # else keep the log for the error message
            shutil.rmtree(work, ignore_errors=True)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }
