"""Running ``multibot start`` as a real subprocess in a test, and watching what it publishes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from redis.asyncio import Redis

from bus import Event
from bus.keys import Keys
from bus.wire import decode
from manager.control import ControlError, call
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]
#: Fast timings for tests: quick heartbeats, checks and failover.
FAST = """
[supervisor]
heartbeat_interval = 0.2
heartbeat_timeout = 2.0
startup_timeout = 20.0
lease_ttl = 1.5

[coordinator]
interval = 0.3
lag_threshold = 5
lease_ttl = 2.0

[bus.consumer]
block_ms = 500
visibility_timeout = 5.0
"""


def bot_toml(bot_id: str, entry: str, **options: Any) -> str:
    """A ``[[bots]]`` table."""
    lines = ["[[bots]]", f'id = "{bot_id}"', f'entry = "{entry}"']
    restart = options.pop("restart", None)
    for key, value in options.items():
        lines.append(f"{key} = {_toml(value)}")
    if restart:
        lines.append("[bots.restart]")
        lines += [f"{k} = {_toml(v)}" for k, v in restart.items()]
    return "\n".join(lines) + "\n"


def bots_before_reload(entry: str) -> str:
    """The bots of a config about to be rewritten by :func:`rewrite_for_reload`: ``keep``,
    ``drop`` and ``change``, each running ``entry``."""
    return bot_toml("keep", entry) + bot_toml("drop", entry) + bot_toml("change", entry)


def rewrite_for_reload(config_path: Path, entry: str) -> None:
    """Rewrite the bots of the config at ``config_path`` (its settings kept): ``keep`` as
    it was, ``drop`` removed, ``change`` with 2 replicas, ``new`` added."""
    settings = config_path.read_text().split("[[bots]]")[0]
    config_path.write_text(
        settings + bot_toml("keep", entry) + bot_toml("change", entry, replicas=2)
        + bot_toml("new", entry)
    )  # fmt: skip


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


class ManagerProcess:
    """``multibot start --config <tmp>/multibot.toml``, with its stderr in ``log_path``."""

    def __init__(
        self,
        tmp_path: Path,
        config: str,
        *,
        environ: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.config_path = tmp_path / "multibot.toml"
        self.config_path.write_text(config)
        self.data_dir = Path((environ or {}).get("MULTIBOT_DATA_DIR") or tmp_path / "data")
        self.log_path = tmp_path / "manager.log"
        # Any free port for the HTTP API: managers of parallel or leftover runs never clash.
        # Bots run as the test's own OS user (they import their code from the checkout),
        # unless a test of bots under their own users sets MULTIBOT_SUPERVISOR__BOT_USER.
        self._environ = {
            **os.environ,
            "MULTIBOT_API__PORT": "0",
            "MULTIBOT_SUPERVISOR__BOT_USER": "",
            # Events reach the archive without the hold for full blocks (a second each
            # time a test waits for them); the hold has tests of its own.
            "MULTIBOT_ARCHIVE__FILL_WAIT": "0.05",
            **(environ or {}),
        }
        #: The manager's working directory, where its bots start.
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *, wait_ready: bool = True) -> None:
        """Spawn the manager; wait until its control socket says it is ready."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "manager.cli", "start", "--config", str(self.config_path),
                cwd=self.cwd, env=self._environ, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log,
            )  # fmt: skip
        if wait_ready:
            await wait_until(self._ready, 60, "the manager to report ready")

    async def _ready(self) -> bool:
        if self.process is not None and self.process.returncode is not None:
            raise AssertionError(f"the manager exited ({self.process.returncode}):\n{self.log()}")
        try:
            status = await self.status()
        except ControlError:
            return False
        return bool(status["manager"]["ready"])

    async def status(self) -> dict[str, Any]:
        """The manager's status document."""
        result: dict[str, Any] = await call(self.data_dir / "manager.sock", "status", timeout=5)
        return result

    async def api(self) -> tuple[str, str]:
        """The HTTP API's base URL and the admin token the manager generated."""
        url = (await self.status())["manager"]["api"]
        return url, (self.data_dir / "api-admin.token").read_text().strip()

    async def command(self, command: str, **args: Any) -> Any:
        """Send a control command."""
        return await call(self.data_dir / "manager.sock", command, timeout=30, **args)

    async def instances(self, bot_id: str) -> list[dict[str, Any]]:
        """The status rows of one bot's instances."""
        for bot in (await self.status())["bots"]:
            if bot["id"] == bot_id:
                return list(bot["instances"])
        raise AssertionError(f"no bot {bot_id} in the status")

    async def pid(self, bot_id: str, instance: int = 0) -> int:
        """The pid of a running instance (waits for one)."""
        found: list[int] = []

        async def running() -> bool:
            row = (await self.instances(bot_id))[instance]
            if row["pid"] and row["state"] in ("running", "standby"):
                found.append(row["pid"])
                return True
            return False

        await wait_until(running, 20, f"{bot_id}-{instance} to run")
        return found[-1]

    async def terminate(self, timeout: float = 60) -> int:  # noqa: ASYNC109 - a test deadline
        """SIGTERM the manager and wait for its exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL the manager (teardown after a failed test)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def children(self, name: str | None = None) -> list[int]:
        """Pids of the manager's descendants (those whose process is ``name`` if given)."""
        assert self.process is not None
        try:
            found = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in found if name is None or _name(c) == name]

    def log(self) -> str:
        """What the manager logged so far (the tail)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-6000:]


async def events(redis: Redis, keys: Keys, type_prefix: str = "") -> list[Event]:
    """Every event in the namespace's streams whose type starts with ``type_prefix``."""
    found: list[Event] = []
    async for key in redis.scan_iter(match=keys.stream_prefix() + "*", _type="stream"):
        rows: Any = await redis.xrange(key)
        for entry_id, fields in rows:
            event = decode(fields, key, entry_id)
            if event.type.startswith(type_prefix):
                found.append(event)
    return sorted(found, key=lambda e: e.entry_id or "")


def gone(pids: Sequence[int]) -> bool:
    """Whether none of ``pids`` is alive (zombies count as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def _name(process: psutil.Process) -> str:
    try:
        return str(process.name())
    except psutil.NoSuchProcess:
        return ""
