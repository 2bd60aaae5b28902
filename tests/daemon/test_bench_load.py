"""The load process of ``multibot bench-api`` against a real manager's API."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from manager.bench.api_bench import run_load_process
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import bot_toml
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.one_redis]

#: Parsed as an option if it were an argument (``secrets.token_urlsafe`` gives one in 64).
DASHED = "-dash-first-token-0123456789abcdef"
TOKEN = (
    "[api]\n[[api.tokens]]\n"
    f'name = "bench"\nscopes = ["publish"]\ntoken = "{DASHED}"\n'
    "rate_limit = 1000000\nrate_burst = 1000000\n"
)


def _load_command_lines() -> list[list[str]]:
    """The command lines of this process's children running the load generator."""
    found = []
    for child in psutil.Process().children():
        try:
            command = child.cmdline()
        except psutil.Error:  # exited meanwhile
            continue
        if "manager.bench.http_load" in command:
            found.append(command)
    return found


class TestRunLoadProcess:
    async def test_a_token_starting_with_a_dash_is_passed_off_the_command_line(
        self, manager_factory: ManagerFactory
    ) -> None:
        """A ``-…`` token is accepted (202s only), and no argument of the process holds it."""
        manager = await manager_factory(
            bot_toml("steady", "tests.daemon.sample_bots:steady"), extra=TOKEN
        )
        url, _ = await manager.api()
        assert manager.process is not None
        load = asyncio.create_task(
            run_load_process(
                url, DASHED, batch=1, concurrency=2, duration=0.5, warmup=0.2,
                pid=manager.process.pid,
            )
        )  # fmt: skip
        seen: list[list[str]] = []

        def spawned() -> bool:
            seen.extend(_load_command_lines())
            return bool(seen) or load.done()

        await wait_until(spawned, 30, "the load process to start")
        result = await load
        assert seen, "the load process ended before its command line was read"
        assert not [arg for arg in seen[0] if DASHED in arg]
        assert result["events_accepted"] > 0
        assert result["errors"] == {}
        assert result["server_cpu_percent"] is not None
