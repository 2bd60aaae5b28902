"""The fanout: every entry of a routed stream reaches the inbox of each subscribed group, once,
under the stream's id; subscribing backfills without gap or double, even while the stream
is written to; hostile entries and inboxes stop nothing else."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.fanout import Fanout, subscribers
from bus.keys import FANOUT_GROUP, Keys
from bus.pump_script import MOST_VALUES
from bus.wire import TARGET_FIELD
from tests.support import config_set, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]

KEYS = Keys()
STREAM = KEYS.stream("user")
A, B = "bot-group-a", "bot-group-b"


@pytest.fixture
async def fanout(redis: Redis) -> AsyncIterator[Fanout]:
    """The fanout of the ``user`` stream, pumping in the background."""
    pump = Fanout(redis, KEYS, lambda: [STREAM], block=0.1)
    task = asyncio.create_task(pump.run())
    yield pump
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def ids(redis: Redis, key: str) -> list[str]:
    rows: Any = await redis.xrange(key)
    return [entry_id for entry_id, _ in rows]


async def add(redis: Redis, n: int, start: int = 0) -> list[str]:
    return [str(await redis.xadd(STREAM, {"n": str(i)})) for i in range(start, start + n)]


class TestPump:
    async def test_each_entry_reaches_every_subscriber_under_its_id(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """Two subscribers get every entry, same ids and fields; a group that never
        subscribed gets no inbox."""
        assert await fanout.subscribe(STREAM, A) and await fanout.subscribe(STREAM, B)
        assert not await fanout.subscribe(STREAM, A)  # idempotent
        written = await add(redis, 700)  # more than one batch
        for inbox in (KEYS.inbox(A, STREAM), KEYS.inbox(B, STREAM)):
            await wait_until(functools.partial(_len_is, redis, inbox, 700), what="inbox filled")
            assert await ids(redis, inbox) == written
        rows: Any = await redis.xrange(KEYS.inbox(A, STREAM), count=1)
        assert rows[0][1] == {"n": "0"}
        assert await redis.exists(KEYS.inbox("bot-group-c", STREAM)) == 0
        assert await subscribers(redis, KEYS, STREAM) == [A, B]

    async def test_a_retry_for_one_group_reaches_that_groups_inbox_alone(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """A dead letter retried for group B (``target``) is copied to B's inbox only: A's
        consumers would only have skipped it."""
        await fanout.subscribe(STREAM, A)
        await fanout.subscribe(STREAM, B)
        retried = str(await redis.xadd(STREAM, {"n": "0", TARGET_FIELD: f"{B}/handle"}))
        (both,) = await add(redis, 1, start=1)
        inbox_a, inbox_b = KEYS.inbox(A, STREAM), KEYS.inbox(B, STREAM)
        await wait_until(lambda: _len_is(redis, inbox_b, 2), what="both copied to B")
        await wait_until(lambda: _len_is(redis, inbox_a, 1), what="the plain one copied to A")
        assert await ids(redis, inbox_b) == [retried, both]
        assert await ids(redis, inbox_a) == [both]

    async def test_only_its_group_is_on_an_inbox(self, redis: Redis, fanout: Fanout) -> None:
        """The inbox holds the subscriber's group alone; the stream holds the fanout's."""
        await fanout.subscribe(STREAM, A)
        groups: Any = await redis.xinfo_groups(KEYS.inbox(A, STREAM))
        assert [g["name"] for g in groups] == [A]
        on_stream: Any = await redis.xinfo_groups(STREAM)
        assert [g["name"] for g in on_stream] == [FANOUT_GROUP]

    async def test_unsubscribe_deletes_the_inbox(self, redis: Redis, fanout: Fanout) -> None:
        await fanout.subscribe(STREAM, A)
        await add(redis, 3)
        await wait_until(lambda: _len_is(redis, KEYS.inbox(A, STREAM), 3))
        assert await fanout.unsubscribe(STREAM, A)
        assert not await fanout.unsubscribe(STREAM, A)
        await add(redis, 3, start=3)
        await wait_until(lambda: _len_is(redis, STREAM, 6))
        await fanout.pump(STREAM)
        assert await redis.exists(KEYS.inbox(A, STREAM)) == 0


class TestSubscribe:
    async def test_from_the_start_backfills_then_goes_on_live(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """Subscribed at 0 in chunks while the stream is written: every entry once, in
        order, none missed between the backfill and the pump."""
        before = await add(redis, 250)
        writing = asyncio.create_task(add(redis, 500, start=250))
        await asyncio.sleep(0)
        assert await fanout.subscribe(STREAM, A, "0", chunk=40)
        after = await writing
        inbox = KEYS.inbox(A, STREAM)
        await wait_until(lambda: _len_is(redis, inbox, 750), what="every entry in the inbox")
        assert await ids(redis, inbox) == before + after

    async def test_at_new_entries_only(self, redis: Redis, fanout: Fanout) -> None:
        await add(redis, 5)
        await wait_until(lambda: _pumped(redis, 5), what="the pump past the first five")
        await fanout.subscribe(STREAM, A, "$")
        later = await add(redis, 2, start=5)
        inbox = KEYS.inbox(A, STREAM)
        await wait_until(lambda: _len_is(redis, inbox, 2))
        assert await ids(redis, inbox) == later

    async def test_a_group_on_the_stream_moves_to_its_inbox_where_it_had_acked(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """A group of the former layout, with one entry pending: its inbox starts at that
        entry (delivered again: at least once), and the old group is destroyed."""
        written = await add(redis, 4)
        await redis.xgroup_create(STREAM, A, id="0")
        await redis.xreadgroup(A, "c", {STREAM: ">"}, count=3)
        await redis.xack(STREAM, A, written[0])
        assert await fanout.subscribe(STREAM, A)
        assert await ids(redis, KEYS.inbox(A, STREAM)) == written[1:]
        on_stream: Any = await redis.xinfo_groups(STREAM)
        assert A not in [g["name"] for g in on_stream]

    async def test_a_lost_inbox_group_comes_back(self, redis: Redis, fanout: Fanout) -> None:
        """Subscribing again recreates an inbox whose group vanished (a DEL, a flush)."""
        await fanout.subscribe(STREAM, A)
        await redis.delete(KEYS.inbox(A, STREAM))
        assert not await fanout.subscribe(STREAM, A)
        groups: Any = await redis.xinfo_groups(KEYS.inbox(A, STREAM))
        assert [g["name"] for g in groups] == [A]


class TestFaults:
    async def test_at_maxmemory_a_batch_is_copied_whole(self, redis: Redis) -> None:
        """Redis past its maxmemory: a pump script has written (its XREADGROUP) before its
        first XADD, and Redis lets a script that wrote finish, so the batch is copied and
        acked whole, never half; the next pump has nothing left."""
        fanout = Fanout(redis, KEYS, lambda: [STREAM])  # pumped by hand here
        await fanout.subscribe(STREAM, A)
        written = await add(redis, 2)
        await config_set(redis, "maxmemory", 1)  # far below what it holds: writes refused
        try:
            with pytest.raises(ResponseError):
                await redis.xadd(STREAM, {"n": "refused"})
            assert await fanout.pump(STREAM) == 2
        finally:
            await config_set(redis, "maxmemory", 0)
        assert await ids(redis, KEYS.inbox(A, STREAM)) == written
        assert await fanout.pump(STREAM) == 0

    async def test_a_lost_fanout_group_is_made_again_without_a_gap(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """The fanout group destroyed (by hand, say): made again at the lowest inbox last
        id, so what came meanwhile is copied, once."""
        await fanout.subscribe(STREAM, A)
        first = await add(redis, 2)
        inbox = KEYS.inbox(A, STREAM)
        await wait_until(lambda: _len_is(redis, inbox, 2))
        await redis.xgroup_destroy(STREAM, FANOUT_GROUP)
        later = await add(redis, 2, start=2)
        await wait_until(lambda: _len_is(redis, inbox, 4), what="the later entries copied")
        assert await ids(redis, inbox) == first + later


class TestHostile:
    async def test_a_huge_entry_and_a_broken_inbox_stop_nothing_else(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """An entry too big for a script is skipped (counted); an inbox overwritten with a
        string gets nothing; the other subscriber gets every other entry."""
        await fanout.subscribe(STREAM, A)
        await fanout.subscribe(STREAM, B)
        await redis.delete(KEYS.inbox(B, STREAM))
        await redis.set(KEYS.inbox(B, STREAM), "not a stream")
        first = await add(redis, 1)
        huge = {f"f{i}": "x" for i in range(MOST_VALUES)}
        await redis.xadd(STREAM, huge)  # type: ignore[arg-type]
        last = await add(redis, 1, start=1)
        inbox = KEYS.inbox(A, STREAM)
        await wait_until(lambda: _len_is(redis, inbox, 2), what="the normal entries copied")
        assert await ids(redis, inbox) == first + last
        assert fanout.too_big == 1
        assert await redis.get(KEYS.inbox(B, STREAM)) == "not a stream"


async def _len_is(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) == n if await redis.exists(key) else n == 0


async def _pumped(redis: Redis, n: int) -> bool:
    groups: Any = await redis.xinfo_groups(STREAM)
    fan = next((g for g in groups if g["name"] == FANOUT_GROUP), None)
    if fan is None:
        return False
    rows: Any = await redis.xrange(STREAM, count=n)
    return len(rows) == n and fan["last-delivered-id"] >= rows[-1][0] and fan["pending"] == 0
