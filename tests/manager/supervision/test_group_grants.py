"""Tests for manager.supervision.group_grants: the groups a bot may ask the manager for."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus.fanout import Fanout, subscribers
from bus.keys import Keys, group_name
from bus.routing import DEFAULT_ROUTES, DEFAULT_STREAM, Router
from manager.config import BotConfig
from manager.supervision.group_grants import GroupGrants

pytestmark = pytest.mark.redis

KEYS = Keys()
USER, SYSTEM = KEYS.stream("user"), KEYS.stream("system")


def bot(**extra: Any) -> BotConfig:
    return BotConfig.model_validate({"id": "greeter", "entry": "bots.echo:main", **extra})


@pytest.fixture
def grants(redis: Redis) -> GroupGrants:
    fanout = Fanout(redis, KEYS, lambda: [USER, SYSTEM])
    return GroupGrants(redis, KEYS, Router(DEFAULT_ROUTES, DEFAULT_STREAM), fanout)


async def groups(redis: Redis, stream: str) -> dict[str, str]:
    """Group name → last delivered id, of ``stream`` (empty when it does not exist)."""
    if not await redis.exists(stream):
        return {}
    found: Any = await redis.xinfo_groups(stream)
    return {_text(g["name"]): _text(g["last-delivered-id"]) for g in found}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TestGrant:
    async def test_subscribes_the_bots_own_group_at_the_asked_start(
        self, grants: GroupGrants, redis: Redis
    ) -> None:
        """On routed streams the bot's own group is subscribed (its inbox: only it is
        there) at '$' or '0', idempotently; nothing of the bot's is on the stream."""
        group = group_name("greeter")
        last = _text(await redis.xadd(USER, {"a": "1"}))
        assert await grants.grant(bot(), [USER, SYSTEM], "$") == [USER, SYSTEM]
        for stream, start in ((USER, last), (SYSTEM, "0-0")):
            assert await subscribers(redis, KEYS, stream) == [group]
            assert await groups(redis, KEYS.inbox(group, stream)) == {group: start}
            assert group not in await groups(redis, stream)
        assert await redis.xlen(KEYS.inbox(group, USER)) == 0  # at new events only
        assert await grants.grant(bot(), [USER, USER], "0") == [USER]  # subscribed: as is
        assert await redis.xlen(KEYS.inbox(group, USER)) == 0
        assert await grants.grant(bot(id="other"), [USER], "0") == [USER]
        assert await redis.xlen(KEYS.inbox(group_name("other"), USER)) == 1  # from the start

    @pytest.mark.parametrize(
        ("stream", "start_id", "reason"),
        [
            (KEYS.stream("nowhere"), "$", "not a stream of the routing table"),
            ("multibot:dlq", "$", "not a stream of the routing table"),
            ("other:stream:{user}", "0", "not a stream of the routing table"),
            (USER, "9999999999999-0", "neither '$' nor '0'"),
            (USER, "\udcff", "neither '$' nor '0'"),
        ],
    )
    async def test_refuses_what_a_bot_may_not_have(
        self, grants: GroupGrants, redis: Redis, stream: str, start_id: str, reason: str
    ) -> None:
        """Unrouted keys and ids the bot chose are refused and logged; nothing is created."""
        with capture_logs() as logs:
            assert await grants.grant(bot(), [stream], start_id) == []
        assert await groups(redis, stream) == {}
        (entry,) = logs
        assert entry["event"] == "refused a bot's request for a consumer group"
        assert reason in entry["reason"] and entry["bot_id"] == "greeter"

    async def test_a_bot_with_declared_subscriptions_gets_only_their_streams(
        self, grants: GroupGrants, redis: Redis
    ) -> None:
        """A config that declares subscriptions bounds what the bot's code may read."""
        declared = bot(subscriptions=[{"pattern": "user.#"}])
        assert await grants.grant(declared, [USER, SYSTEM], "$") == [USER]
        assert await groups(redis, SYSTEM) == {}
