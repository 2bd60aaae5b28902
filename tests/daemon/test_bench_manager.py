"""``multibot bench-manager`` runs end to end and reports every number; its
:class:`ManagerRun` leaves nothing open however a run ends."""

from __future__ import annotations

import asyncio
import gc
import json
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from manager.bench.manager_bench import ManagerExitedError, ManagerRun
from tests.daemon.test_start import multibot
from tests.support import wait_until


@pytest.mark.slow
@pytest.mark.postgres
def test_reports_start_memory_restart_and_failover() -> None:
    """One round: every figure is there and plausible (not a speed assertion)."""
    done = multibot("bench-manager", "--rounds", "1", "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ready_first_start_s"] > 0
    assert result["ready_second_start_s"] > 0
    assert result["manager_rss_bytes"] > 10 * 1024 * 1024
    assert result["bots"] == 5  # the example bots' instances; the idle bot is apart
    assert result["idle_bot_rss_bytes"] > result["bare_worker_rss_bytes"] > 10 * 1024 * 1024
    ratio = result["idle_bot_rss_bytes"] / result["bare_worker_rss_bytes"]
    assert result["idle_bot_to_bare_ratio"] == round(ratio, 3)
    assert result["restart_s"]["min"] <= result["restart_s"]["max"]
    assert result["failover_s"]["median"] > 0


async def resource_warnings(scenario: Callable[[], Awaitable[None]]) -> list[str]:
    """Run ``scenario``, drop what it made and collect it; the ResourceWarnings that gave
    (an unclosed socket, transport or file warns when it is collected)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await scenario()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


class TestManagerRun:
    async def test_a_manager_that_fails_to_start_is_reported_and_its_socket_closed(
        self, reachable_dir: Path
    ) -> None:
        """An exit before READY=1 raises at once naming the exit code; nothing stays open."""

        async def scenario() -> None:
            run = ManagerRun(reachable_dir, env={"MULTIBOT_API__PORT": "not-a-port"})
            with pytest.raises(ManagerExitedError, match="exited with code 1 before READY=1"):
                await run.start()
            assert not run.listening
            assert not run.socket_path.exists()
            assert run.process is not None and run.process.returncode == 1
            assert "api.port" in run.log_path.read_text()

        assert await resource_warnings(scenario) == []

    @pytest.mark.postgres
    async def test_a_cancelled_start_kills_the_manager_and_closes_the_socket(
        self, reachable_dir: Path
    ) -> None:
        """Cancelled while waiting for READY=1: the process is killed, nothing stays open."""

        async def scenario() -> None:
            async with ManagerRun(reachable_dir) as run:
                starting = asyncio.create_task(run.start())
                await wait_until(lambda: run.process is not None, 30, "the manager to spawn")
                starting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await starting
                assert not run.listening
                assert run.process is not None and run.process.returncode is not None

        assert await resource_warnings(scenario) == []
