"""Tests for manager.observe.lag: consumer group lag on real Redis 7.0 and 6.2."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.fanout import Fanout
from bus.keys import FANOUT_GROUP, Keys
from manager.observe.lag import GroupLag, group_lags, stream_keys

pytestmark = pytest.mark.redis

KEYS = Keys("lagtest")
STREAM = KEYS.stream("user")


async def publish(redis: Redis, n: int, stream: str = STREAM) -> list[str]:
    """XADD ``n`` entries; their IDs."""
    return [str(await redis.xadd(stream, {"n": str(i)})) for i in range(n)]


async def consume(
    redis: Redis, count: int, group: str = "g", *, ack: bool = True, stream: str = STREAM
) -> list[str]:
    """Read up to ``count`` new entries as consumer c of ``group``; ack them unless told not."""
    reply: Any = await redis.xreadgroup(group, "c", {stream: ">"}, count=count)
    ids = [entry_id for _, rows in reply for entry_id, _ in rows]
    if ack and ids:
        await redis.xack(stream, group, *ids)
    return ids


async def only(redis: Redis, **kwargs: Any) -> GroupLag:
    """The single group's lag on STREAM."""
    (lag,) = await group_lags(redis, [STREAM], **kwargs)
    return lag


class TestGroupLags:
    async def test_caught_up_then_behind(self, redis: Redis) -> None:
        """Lag is 0 once everything is consumed and N after N more are published."""
        await publish(redis, 5)
        await redis.xgroup_create(STREAM, "g", id="0")
        ids = await consume(redis, 100)
        assert await only(redis) == GroupLag(
            stream=STREAM,
            group="g",
            lag=0,
            pending=0,
            consumers=1,
            last_delivered_id=ids[-1],
            lag_capped=False,
        )
        await publish(redis, 7)
        assert (await only(redis)).lag == 7

    async def test_partly_consumed(self, redis: Redis) -> None:
        """A group that read some of the stream lags by the rest."""
        await publish(redis, 10)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 4)
        assert (await only(redis)).lag == 6

    async def test_new_group_lags_by_whole_stream(self, redis: Redis) -> None:
        """A group created at 0 has every entry ahead of it; one created at $ has none."""
        await publish(redis, 8)
        await redis.xgroup_create(STREAM, "from-start", id="0")
        await redis.xgroup_create(STREAM, "from-now", id="$")
        lags = {lag.group: lag.lag for lag in await group_lags(redis, [STREAM])}
        assert lags == {"from-start": 8, "from-now": 0}

    async def test_pending_is_counted(self, redis: Redis) -> None:
        """Delivered but unacknowledged entries are pending, not lag."""
        await publish(redis, 10)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 5, ack=False)
        lag = await only(redis)
        assert (lag.lag, lag.pending, lag.consumers) == (5, 5, 1)

    async def test_trimmed_past_last_delivered(self, redis: Redis) -> None:
        """After XTRIM removed unread entries, lag is what is left to read (Redis 7.0 itself
        still counts the trimmed ones)."""
        await publish(redis, 10)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 4)
        await redis.xtrim(STREAM, maxlen=3, approximate=False)
        assert (await only(redis)).lag == 3

    async def test_read_after_trim(self, redis: Redis) -> None:
        """Reading on after a trim that skipped entries gives the true remaining count."""
        await publish(redis, 10)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 1)
        await redis.xtrim(STREAM, maxlen=5, approximate=False)
        await consume(redis, 1)
        assert (await only(redis)).lag == 4
        await consume(redis, 100)
        assert (await only(redis)).lag == 0

    async def test_deleted_entry_ahead(self, redis: Redis) -> None:
        """XDEL of an unread entry (Redis 7 then reports lag as nil) is counted around."""
        ids = await publish(redis, 10)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 3)
        await redis.xdel(STREAM, ids[6])
        assert (await only(redis)).lag == 6

    async def test_count_is_capped(self, redis: Redis) -> None:
        """A counted backlog above the cap is reported as the cap, flagged."""
        ids = await publish(redis, 30)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 1)
        await redis.xdel(STREAM, ids[20])  # forces counting on Redis 7 too
        lag = await only(redis, cap=5)
        assert (lag.lag, lag.lag_capped) == (5, True)
        lag = await only(redis, cap=28)
        assert (lag.lag, lag.lag_capped) == (28, False)

    async def test_missing_stream_is_skipped(self, redis: Redis) -> None:
        """A key that does not exist yields no rows; the other streams are still reported."""
        await publish(redis, 2)
        await redis.xgroup_create(STREAM, "g", id="0")
        other = KEYS.stream("other")
        await publish(redis, 1, stream=other)  # a stream without groups: no rows either
        lags = await group_lags(redis, [KEYS.stream("missing"), STREAM, other])
        assert [(lag.stream, lag.group, lag.lag) for lag in lags] == [(STREAM, "g", 2)]

    async def test_every_group_in_stream_order(self, redis: Redis) -> None:
        """Each group of each stream gets a row, streams in the order given."""
        second = KEYS.stream("second")
        for stream in (STREAM, second):
            await publish(redis, 3, stream=stream)
            for group in ("a", "b"):
                await redis.xgroup_create(stream, group, id="0")
        await consume(redis, 1, group="b", stream=second)
        rows = [(x.stream, x.group, x.lag) for x in await group_lags(redis, [second, STREAM])]
        assert rows == [(second, "a", 3), (second, "b", 2), (STREAM, "a", 3), (STREAM, "b", 3)]

    async def test_non_stream_key_is_an_error(self, redis: Redis) -> None:
        """A key of another type is a real error, not silently skipped."""
        await redis.set(STREAM, "not a stream")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await group_lags(redis, [STREAM])

    async def test_cap_must_be_positive(self, redis: Redis) -> None:
        """A cap below one entry is rejected."""
        with pytest.raises(ValueError, match="cap must be at least 1"):
            await group_lags(redis, [STREAM], cap=0)

    async def test_undecoded_client(self, redis_url: str, redis: Redis) -> None:
        """A client that returns bytes gives the same text fields."""
        ids = await publish(redis, 3)
        await redis.xgroup_create(STREAM, "g", id="0")
        await consume(redis, 1)
        async with Redis.from_url(redis_url) as raw:
            (lag,) = await group_lags(raw, [STREAM])
        assert (lag.group, lag.lag, lag.last_delivered_id) == ("g", 2, ids[0])


class TestStreamKeys:
    async def test_finds_only_streams_of_the_namespace(self, redis: Redis) -> None:
        """Streams under the prefix are listed, sorted; strings and other namespaces not."""
        await publish(redis, 1, stream=KEYS.stream("b"))
        await publish(redis, 1, stream=KEYS.stream("a"))
        await redis.set(KEYS.stream("not-a-stream"), "x")
        await publish(redis, 1, stream=Keys("elsewhere").stream("a"))
        await publish(redis, 1, stream=KEYS.dead_letters())
        assert await stream_keys(redis, KEYS) == [KEYS.stream("a"), KEYS.stream("b")]

    async def test_glob_characters_in_namespace_are_literal(self, redis: Redis) -> None:
        """A namespace containing * or [ matches only itself."""
        odd = Keys("ns*[1]")
        await publish(redis, 1, stream=odd.stream("x"))
        await publish(redis, 1, stream=Keys("nsX1").stream("x"))
        await publish(redis, 1, stream=Keys("ns1").stream("x"))
        assert await stream_keys(redis, odd) == [odd.stream("x")]

    async def test_empty(self, redis: Redis) -> None:
        """No streams: an empty list."""
        assert await stream_keys(redis, KEYS) == []


class TestInboxes:
    async def test_a_subscribed_group_is_reported_under_its_stream_from_its_inbox(
        self, redis: Redis
    ) -> None:
        """With the keys, a group read in its inbox is counted there and named under the
        stream; the fanout's own group shows what it has not copied yet."""
        fanout = Fanout(redis, KEYS, lambda: [STREAM])
        await fanout.subscribe(STREAM, "bot-group-a", "0")
        await publish(redis, 5)
        await fanout.pump(STREAM)
        inbox = KEYS.inbox("bot-group-a", STREAM)
        await consume(redis, 2, "bot-group-a", stream=inbox)
        await publish(redis, 1)  # not copied yet
        lags = {lag.group: lag for lag in await group_lags(redis, [STREAM], keys=KEYS)}
        assert set(lags) == {FANOUT_GROUP, "bot-group-a"}
        assert (lags["bot-group-a"].stream, lags["bot-group-a"].lag) == (STREAM, 3)
        assert lags[FANOUT_GROUP].lag == 1
        assert [lag.group for lag in await group_lags(redis, [STREAM])] == [FANOUT_GROUP]
