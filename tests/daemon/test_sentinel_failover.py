"""A real manager and its bots on a Sentinel-watched primary: SIGKILL the primary while a
bot publishes with publish_replicas = 1, and every confirmed event still reaches the
subscribed bot, through the outbox relay and the fanout, on the promoted replica."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bus.keys import Keys
from manager.embedded.postgres_server import PostgresServer
from tests.daemon.manager_process import FAST, ManagerProcess, bot_toml
from tests.sentinel_support import SentinelSet
from tests.support import redis_client, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow, pytest.mark.one_redis]

CONFIRMED = re.compile(r'"event": "confirmed ([0-9a-f-]+)"')


def confirmed(manager: ManagerProcess) -> list[str]:
    """Event ids the emitter bot printed as confirmed (its lines reach the manager's log)."""
    return CONFIRMED.findall(manager.log_path.read_text(errors="replace"))


async def test_a_primary_failover_loses_no_confirmed_event_under_the_manager(
    voting_sentinels: SentinelSet, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The primary is SIGKILLed mid-stream and comes back as a replica; the manager, the
    emitter and the collector follow the promoted replica, the bots' users are there, and
    the collector has handled every event whose publish returned."""
    config = (
        f'data_dir = "data"\nredis_url = "{voting_sentinels.url}"\n'
        f'postgres_dsn = "{postgres_server.dsn}"\n'
        "[bus]\npublish_replicas = 1\n"
        + FAST
        + bot_toml("emitter", "tests.daemon.sample_bots:emitter")
        + bot_toml(
            "collector", "tests.daemon.sample_bots:collector", subscriptions=[{"pattern": "test.#"}]
        )
    )
    (tmp_path / "manager").mkdir()
    manager = ManagerProcess(tmp_path / "manager", config)
    try:
        await manager.start()
        await wait_until(lambda: len(confirmed(manager)) >= 150, 60, "events before the kill")
        old_port = voting_sentinels.primary.port
        await voting_sentinels.primary.kill()
        await wait_until(
            lambda: _moved(voting_sentinels, old_port), 30, "the sentinels to promote the replica"
        )
        await voting_sentinels.primary.start()  # rejoins as a replica of the promoted one
        await wait_until(lambda: len(confirmed(manager)) >= 600, 90, "the emitter to finish")
        handled_key = Keys().bot_state("collector", "handled")
        async with redis_client(voting_sentinels.url, decode_responses=True) as redis:

            async def all_handled() -> bool:
                handled = set(await redis.smembers(handled_key))
                return set(confirmed(manager)) <= handled

            await wait_until(all_handled, 60, "the collector to handle every confirmed event")
        status = await manager.status()
        assert status["manager"]["ready"] is True
        assert await manager.terminate() == 0
    finally:
        await manager.kill()


async def _moved(voting_sentinels: SentinelSet, old_port: int | None) -> bool:
    port = await voting_sentinels.agreed_primary_port()
    return port is not None and port != old_port
