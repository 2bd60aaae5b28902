"""Bots are hostile code: a real manager keeps its secrets, socket and environment from them."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis

from bus.keys import Keys
from manager.daemon.isolation import SHARED, switch_blockers
from manager.embedded.child_process import OsUser, child_setup
from tests.daemon.conftest import ManagerFactory
from tests.daemon.hostile_bot import SECRET_FILES
from tests.daemon.manager_process import FAST, REPO, ManagerProcess, bot_toml
from tests.support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.one_redis]

#: The API token the manager gets through ``token_env``: no bot may see it.
TOKEN = "crm-token-the-bots-must-never-see"
TOKENS = """
[[api.tokens]]
name = "crm"
scopes = ["publish"]
token_env = "CRM_TOKEN"
"""
#: What a bot's environment may hold: the allow-list, its user's identity, its own config's.
ALLOWED = {"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME"}


def hostile(data_dir: Path, config: Path) -> str:
    """The ``[[bots]]`` table of the hostile bot, aimed at this manager."""
    return bot_toml(
        "hostile",
        "tests.daemon.hostile_bot:main",
        environment={
            "PROBE_DATA_DIR": str(data_dir),
            "PROBE_CONFIG": str(config),
            "PROBE_SECRET_ENV": "CRM_TOKEN",
        },
    )


async def report_of(redis: Redis) -> dict[str, Any]:
    """What the hostile bot found (it writes its report once, at its start)."""
    key = Keys().bot_state("hostile", "report")
    report: list[str] = []

    async def written() -> bool:
        value = await redis.get(key)
        report.extend([str(value)] if value else [])
        return bool(report)

    await wait_until(written, 30, "the hostile bot's report")
    found: dict[str, Any] = json.loads(report[0])
    return found


def assert_environment_is_minimal(report: dict[str, Any]) -> None:
    """Nothing but the allow-list, LC_*, PYTHON* for imports and IO, and its own PROBE_*."""
    assert report["token_in_environment"] is False
    for name in report["environment"]:
        assert name in ALLOWED or name.startswith(("LC_", "PYTHON", "PROBE_")), (
            f"{name} leaked into the bot's environment"
        )


@pytest.fixture(scope="module")
def nobody() -> OsUser:
    """``nobody`` as the bots' OS user, when the manager can switch to it and it can run
    this checkout's Python (skips otherwise, saying what is missing)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the manager switches bots to another OS user")
    try:
        user = OsUser.named("nobody")
    except KeyError:
        pytest.skip("needs an OS user named nobody (nothing is added to the machine)")
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import bots.runtime"],
            preexec_fn=child_setup(user), cwd="/", capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        problem = probe.stderr.strip().splitlines()[-1:] if probe.returncode else None
    except OSError as exc:
        problem = [str(exc)]
    if problem:
        pytest.skip(
            f"nobody cannot run this checkout's Python {sys.executable} ({problem[0]}): run "
            "the tests from a checkout and a Python other users can read (a venv of "
            "/usr/bin/python3 outside /root, say)"
        )
    return user


@pytest.fixture
def bots_dir(reachable_dir: Path) -> Path:
    """The manager's working directory, where bots start: readable by any user, with the
    test bots importable (``tests``: the checkout's, which may be closed to others)."""
    directory = reachable_dir / "bots-cwd"
    directory.mkdir()
    directory.chmod(0o755)
    (directory / "tests").symlink_to(REPO / "tests")
    return directory


class TestBotsUnderTheirOwnUser:
    async def test_a_hostile_bot_gets_nothing_of_the_manager(
        self, tmp_path: Path, reachable_dir: Path, bots_dir: Path, nobody: OsUser
    ) -> None:
        """Run as nobody on embedded Redis and PostgreSQL, a bot cannot read any secret, use
        the control socket, signal the manager or see a token_env token; the data dir is
        0600/0700 (0711 for PostgreSQL's user to pass), also what was left 0644."""
        data = reachable_dir / "data"
        left_open = [data / "api-admin.token", data / "redis" / "redis.log"]
        for path in left_open:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("an-admin-token-of-an-earlier-run\n")
            path.chmod(0o644)
        (data / "redis").chmod(0o755)
        manager = ManagerProcess(
            tmp_path,
            FAST + TOKENS + hostile(data, tmp_path / "multibot.toml"),
            environ={
                "MULTIBOT_DATA_DIR": str(data),
                "MULTIBOT_SUPERVISOR__BOT_USER": nobody.name,
                "CRM_TOKEN": TOKEN,
            },
            cwd=bots_dir,
        )
        try:
            await manager.start()
            password = (data / "redis" / "password").read_text().strip()
            url = f"unix://:{password}@{data / 'redis' / 'redis.sock'}?db=0"
            async with Redis.from_url(url, decode_responses=True) as redis:
                report = await report_of(redis)
            assert (report["uid"], report["gid"], report["groups"]) == (nobody.uid, nobody.gid, [])
            assert report["cwd"] == str(bots_dir)
            for attempt in ("config", "manager_environ", "signal_manager", "list_data_dir"):
                assert report[attempt].startswith("refused"), (attempt, report[attempt])
            for attempt in ("connection", "stop", *SECRET_FILES):
                assert report[attempt].startswith("refused"), (attempt, report[attempt])
            assert_environment_is_minimal(report)
            pid = await manager.pid("hostile")
            assert psutil.Process(pid).uids().real == nobody.uid
            status = await manager.status()
            assert status["manager"]["bot_users"] == [nobody.name]
            assert status["manager"]["ready"] is True  # `stop` did not get through
            self._assert_private(data)
            warned = [
                json.loads(line)
                for line in manager.log_path.read_text().splitlines()
                if "data files were readable by others" in line
            ]
            assert len(warned) == 1
            for path in left_open:
                assert f"{path} (644 → 600)" in warned[0]["tightened"]
            assert await manager.terminate() == 0
        finally:
            await manager.kill()

    @staticmethod
    def _assert_private(data: Path) -> None:
        """Every entry under ``data`` is its owner's only; ``data`` itself is 0711."""
        assert stat.S_IMODE(data.stat().st_mode) == 0o711
        for root, dirs, files in os.walk(data):
            for name in (*dirs, *files):
                path = Path(root, name)
                info = path.lstat()
                if not stat.S_ISLNK(info.st_mode):
                    assert stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{path} is {info.st_mode:o}"


@pytest.mark.redis
@pytest.mark.postgres
class TestSharedUser:
    async def test_without_switching_the_pid_check_and_environment_still_hold(
        self,
        manager_factory: ManagerFactory,
        tmp_path: Path,
        redis: Redis,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """bot_user = "": the start says isolation is Redis-only, the status shows it, and the
        bot still gets no token and no answer from the control socket (it is a bot)."""
        monkeypatch.setenv("CRM_TOKEN", TOKEN)  # the manager's environment
        work = tmp_path / "manager-0"  # the factory's first manager
        manager = await manager_factory(
            hostile(work / "data", work / "multibot.toml"), extra=TOKENS
        )
        report = await report_of(redis)
        for attempt in ("connection", "stop"):
            assert "is a bot or was started by one" in report[attempt], report[attempt]
        assert_environment_is_minimal(report)
        status = await manager.status()
        assert status["manager"]["bot_users"] == []
        assert status["manager"]["ready"] is True
        logged = [json.loads(line) for line in manager.log_path.read_text().splitlines()]
        (shared,) = [entry for entry in logged if entry.get("event") == SHARED]
        assert shared["level"] == "warning" and shared["todo"]
        assert await manager.terminate() == 0


class TestStartErrors:
    async def test_a_missing_bot_user_stops_the_start_at_once(self, tmp_path: Path) -> None:
        """A bot user that does not exist: exit 1 before any server or bot starts, naming
        the useradd command and the setting."""
        if switch_blockers():
            pytest.skip("needs a manager that can switch users (root)")
        config = (
            'redis_url = "redis://127.0.0.1:1"\npostgres_dsn = "postgresql://x@127.0.0.1:1/x"\n'
        )
        manager = ManagerProcess(
            tmp_path,
            config + FAST + bot_toml("a", "tests.daemon.sample_bots:steady"),
            environ={"MULTIBOT_SUPERVISOR__BOT_USER": "multibot-no-such-user"},
        )
        try:
            await manager.start(wait_ready=False)
            assert manager.process is not None
            assert await asyncio.wait_for(manager.process.wait(), 30) == 1
            log = manager.log_path.read_text()
            assert "supervisor.bot_user: there is no OS user 'multibot-no-such-user'" in log
            assert "useradd --system" in log
            assert "manager starting" not in log  # nothing was started
        finally:
            await manager.kill()
