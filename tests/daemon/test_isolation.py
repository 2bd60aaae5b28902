"""The boundary between a bot and everything else, tried by a hostile bot under a real manager.

``tests/daemon/probe_bot.py`` runs as a bot of the fleet, through the three Redis users the
manager gives it, and reports what each of its attempts did. Every attempt must be refused,
on Redis 7 and 6.2 alike, except any this release does not close (``OPEN_EVERYWHERE``,
empty now): those must still succeed, so that closing one fails this test until the
README's Security section and this list say so.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from bus.keys import Keys
from manager.embedded.redis_server import RedisBinary
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import bot_toml
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

PROBE = "tests.daemon.probe_bot:main"
STEADY = "tests.daemon.sample_bots:steady"
#: Holes a bot can still use (none: its group lives in its own inboxes, the only keys its
#: group commands reach). Closing or opening one must update README "Security".
OPEN_EVERYWHERE: set[str] = set()
#: What a command unknown to the server answers (6.2 has no FUNCTION): no permission needed.
UNKNOWN = "failed: unknown command"


async def entries_of(redis: Redis, stream: str, type_: str) -> list[dict[str, str]]:
    rows: Any = await redis.xrange(stream)
    return [fields for _, fields in rows if fields.get("type") == type_]


class TestProbeBot:
    async def test_every_may_not_is_refused(
        self,
        manager_factory: ManagerFactory,
        redis_url: str,
        redis_binary: RedisBinary,
        keys: Keys,
    ) -> None:
        """The probe's every attempt is refused by Redis, but the known open ones."""
        routes = '[bus.routes]\nprobe = "probe"\n'
        bots = bot_toml("victim", STEADY) + bot_toml("probe", PROBE)
        manager = await manager_factory(bots, extra=routes)
        async with Redis.from_url(redis_url, decode_responses=True) as admin:

            async def reported() -> bool:
                return bool(await entries_of(admin, keys.stream("bot"), "test.probe.report"))

            await wait_until(reported, 30, f"the probe's report; manager log:\n{manager.log()}")
            (report,) = await entries_of(admin, keys.stream("bot"), "test.probe.report")
            forged = await entries_of(admin, keys.stream("bot"), "test.probe.forged")
        outcomes: dict[str, str] = orjson.loads(report["data"])
        outcomes["publish as the manager"] = (
            "succeeded" if forged and forged[0]["source"] == "manager" else "refused"
        )
        got = {
            name: outcome
            for name, outcome in outcomes.items()
            if outcome != ("succeeded" if name in OPEN_EVERYWHERE else "refused")
            and not (name == "load a function" and outcome.startswith(UNKNOWN))
        }
        assert got == {}, "attempts whose outcome differs from the documented boundary"
        assert len(outcomes) == 35
