"""The example bots under a real manager, each on its own Redis user: coordination works."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from bus import BusClient, EventType
from bus.keys import Keys
from bus.settings import BusSettings
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import bot_toml, events
from tests.support import wait_until

# Whole-daemon behaviour; what differs between Redis versions is tested below it (bus,
# lag, handover, lease) on each version.
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.one_redis, pytest.mark.deployments]
SUBSCRIPTIONS = [
    {"pattern": "user.message.received"},
    {"pattern": "multibot.user.*"},
    {"pattern": "multibot.load.balance_required"},
]


async def test_shared_user_roles_and_load_offers(
    manager_factory: ManagerFactory, redis: Redis, keys: Keys, redis_url: str
) -> None:
    """A user of two bots: detected once, roles taken, secondary hands over; offers of help."""
    manager = await manager_factory(
        bot_toml("greeter", "bots.chatbot:main", subscriptions=SUBSCRIPTIONS)
        + bot_toml("matcher", "bots.chatbot:main", replicas=2, subscriptions=SUBSCRIPTIONS)
        + bot_toml("shared-users", "bots.shared_users:main", replicas=2, standby=True)
    )
    async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
        for bot in ("greeter", "matcher"):
            await bus.publish(EventType.MESSAGE_RECEIVED, {"user_id": "u1", "bot_id": bot})

        async def roles_taken() -> bool:
            return len(await events(redis, keys, "multibot.user.role_assigned")) == 2

        await wait_until(roles_taken, 20, "both bots to take a role for u1")
        detected = await events(redis, keys, EventType.SHARED_USER_DETECTED)
        assert [e.data["bot_ids"] for e in detected] == [["greeter", "matcher"]]
        roles = {e.source: e.data["role"] for e in await events(redis, keys, "multibot.user.role")}
        assert roles == {"greeter": "primary", "matcher": "secondary"}
        # The secondary now hands u1's messages to the primary, which answers.
        asked = await bus.publish(
            EventType.MESSAGE_RECEIVED, {"user_id": "u1", "bot_id": "matcher", "text": "again"}
        )

        async def answered_by_primary() -> bool:
            sent = await events(redis, keys, EventType.MESSAGE_SENT)
            return any(e.source == "greeter" and e.correlation_id == asked for e in sent)

        await wait_until(answered_by_primary, 20, "the primary to answer the handed-over message")
        balance = await bus.publish(
            EventType.LOAD_BALANCE_REQUIRED, {"reason": "test", "bot_id": "greeter"}
        )

        async def offers() -> set[str]:
            found = await events(redis, keys, "multibot.load.offer")
            return {e.source for e in found if e.causation_id == balance}

        async def offered() -> bool:
            return bool(await offers())

        await wait_until(offered, 20, "an offer of help for greeter")
        assert await offers() == {"matcher"}  # greeter does not offer help to itself
    # Their state lives under their own keys, which only they may touch.
    assert await redis.get(keys.bot_state("matcher", "role", "u1")) == "greeter"
    assert await manager.terminate() == 0


async def test_bot_output_is_logged_without_blocking(
    manager_factory: ManagerFactory,
) -> None:
    """2 MB of stdout and a 100 kB line: the bot runs on, lines reach the log with its id."""
    manager = await manager_factory(bot_toml("talker", "tests.daemon.sample_bots:chatty"))
    await manager.pid("talker")

    def logged() -> bool:
        return "chatty done" in manager.log_path.read_text(errors="replace")

    await wait_until(logged, 20, "the bot's last line in the manager's log")
    text = manager.log_path.read_text(errors="replace")
    assert '"event": "line 19999 ' in text
    assert '"bot_id": "talker"' in text
    assert await manager.terminate() == 0
