"""Tests for manager.supervision.handover: the crash ledger, and a dead consumer's entries
on real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from bus.dlq import DeadLetters
from bus.keys import Keys
from manager.supervision.handover import (
    CrashLedger,
    dead_letter_crashed,
    pending_of,
    release_pending,
    retire_consumer,
)

KEYS = Keys()
STREAM = KEYS.stream("user")
OTHER = KEYS.stream("bot")
GROUP = "bot-group-a"
#: Where GROUP reads STREAM under the manager.
INBOX = KEYS.inbox(GROUP, STREAM)
DEAD = "a-0"
LIVE = "a-1"
A = (STREAM, "1-0")
B = (STREAM, "2-0")
C = (OTHER, "1-0")


async def deliver(redis: Redis, n: int, consumer: str = DEAD, stream: str = STREAM) -> list[str]:
    """Add ``n`` entries to a new group on ``stream`` and read them all as ``consumer``."""
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"id": f"event-{i}", "type": "user.message.received", "n": str(i)})
    ids = [str(entry_id) for entry_id in await pipe.execute()]
    await redis.xgroup_create(stream, GROUP, id="0")
    reply: Any = await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=n)
    assert len(reply[0][1]) == n
    return ids


async def consumers(redis: Redis, stream: str = STREAM) -> dict[str, int]:
    """Each consumer of the group and how many entries it has pending."""
    rows: Any = await redis.xinfo_consumers(stream, GROUP)
    return {row["name"]: row["pending"] for row in rows}


class TestCrashLedger:
    def test_counts_consecutive_crashes(self) -> None:
        """An entry in flight at each crash counts up, one per crash."""
        ledger = CrashLedger(threshold=5)
        for _ in range(3):
            ledger.record_crash([A, B], "exit 1")
        assert ledger.counts == {A: 3, B: 3}

    def test_entry_missing_from_a_crash_starts_over(self) -> None:
        """An entry not in flight at a crash is forgotten; if it comes back it counts from 1."""
        ledger = CrashLedger(threshold=5)
        ledger.record_crash([A, B], "exit 1")
        ledger.record_crash([A], "exit 1")
        assert ledger.counts == {A: 2}
        ledger.record_crash([A, B], "exit 1")
        assert ledger.counts == {A: 3, B: 1}
        assert ledger.exits[B] == ["exit 1"]

    def test_threshold_returns_the_entries(self) -> None:
        """record_crash returns the entries that reached the threshold, and only those."""
        ledger = CrashLedger(threshold=2)
        assert ledger.record_crash([A, C], "exit 1") == []
        assert sorted(ledger.record_crash([A, B, C], "killed by SIGKILL")) == sorted([A, C])
        assert sorted(ledger.record_crash([A, B], "exit 1")) == sorted([A, B])

    def test_duplicates_in_one_crash_count_once(self) -> None:
        """An entry listed twice at one crash is counted once."""
        ledger = CrashLedger(threshold=3)
        ledger.record_crash([A, A, A], "exit 1")
        assert ledger.counts == {A: 1}

    def test_exits_are_recorded_in_order(self) -> None:
        """Each entry keeps the exit statuses of the crashes it was in flight at."""
        ledger = CrashLedger(threshold=3)
        ledger.record_crash([A], "exit 1")
        ledger.record_crash([A], "killed by SIGKILL")
        ledger.record_crash([A], "exit 2")
        assert ledger.exits[A] == ["exit 1", "killed by SIGKILL", "exit 2"]

    def test_forget(self) -> None:
        """forget drops an entry's count and exits; forgetting an unknown entry is harmless."""
        ledger = CrashLedger(threshold=3)
        ledger.record_crash([A, B], "exit 1")
        ledger.forget(A)
        ledger.forget(C)
        assert ledger.counts == {B: 1}
        assert ledger.exits == {B: ["exit 1"]}

    def test_crash_with_nothing_in_flight_keeps_counts(self) -> None:
        """A crash with no entry in flight (another replica's, say) changes no count."""
        ledger = CrashLedger(threshold=3)
        ledger.record_crash([A], "exit 1")
        assert ledger.record_crash([], "exit 1") == []
        assert ledger.counts == {A: 1}
        assert ledger.exits == {A: ["exit 1"]}


@pytest.mark.redis
class TestPendingOf:
    async def test_lists_the_consumers_pending_entries(self, redis: Redis) -> None:
        """pending_of gives the ids pending on one consumer, not on others."""
        ids = await deliver(redis, 3)
        await redis.xadd(STREAM, {"n": "other"})
        await redis.xreadgroup(GROUP, LIVE, {STREAM: ">"})
        assert await pending_of(redis, STREAM, GROUP, DEAD) == ids
        assert len(await pending_of(redis, STREAM, GROUP, LIVE)) == 1
        assert await pending_of(redis, STREAM, GROUP, "nobody") == []

    async def test_pages_past_500_entries(self, redis: Redis) -> None:
        """More than one page of pending entries comes back whole and in order."""
        ids = await deliver(redis, 1234)
        assert await pending_of(redis, STREAM, GROUP, DEAD) == ids

    async def test_exactly_one_page(self, redis: Redis) -> None:
        """Exactly 500 pending entries are all returned (the empty next page ends it)."""
        ids = await deliver(redis, 500)
        assert await pending_of(redis, STREAM, GROUP, DEAD) == ids

    async def test_missing_group_is_empty(self, redis: Redis) -> None:
        """No group (or no stream) means nothing pending."""
        await redis.xadd(STREAM, {"n": "1"})
        assert await pending_of(redis, STREAM, GROUP, DEAD) == []
        assert await pending_of(redis, OTHER, GROUP, DEAD) == []


@pytest.mark.redis
class TestReleasePending:
    async def test_released_entries_are_claimable_at_once(self, redis: Redis) -> None:
        """After release, XAUTOCLAIM with a long min-idle takes a just-delivered entry."""
        ids = await deliver(redis, 3)
        min_idle = 60_000
        before: Any = await redis.xautoclaim(STREAM, GROUP, LIVE, min_idle, justid=True)
        assert before == []
        assert await release_pending(redis, STREAM, GROUP, DEAD, idle_ms=min_idle + 1000) == 3
        claimed: Any = await redis.xautoclaim(STREAM, GROUP, LIVE, min_idle, justid=True)
        assert claimed == ids
        assert await consumers(redis) == {DEAD: 0, LIVE: 3}

    async def test_entries_stay_on_the_dead_consumer_until_claimed(self, redis: Redis) -> None:
        """Release does not move entries: they stay pending on the dead consumer."""
        ids = await deliver(redis, 2)
        await release_pending(redis, STREAM, GROUP, DEAD, idle_ms=120_000)
        assert await pending_of(redis, STREAM, GROUP, DEAD) == ids

    async def test_delivery_count_is_kept(self, redis: Redis) -> None:
        """Release does not count as a delivery, so poison detection is not skewed."""
        await deliver(redis, 2)
        await release_pending(redis, STREAM, GROUP, DEAD, idle_ms=120_000)
        rows: Any = await redis.xpending_range(STREAM, GROUP, "-", "+", 10)
        assert [row["times_delivered"] for row in rows] == [1, 1]
        assert all(row["time_since_delivered"] >= 120_000 for row in rows)

    async def test_releases_more_than_a_page(self, redis: Redis) -> None:
        """Every pending entry is released, past the 500-entry page."""
        ids = await deliver(redis, 1100)
        assert await release_pending(redis, STREAM, GROUP, DEAD, idle_ms=120_000) == 1100
        claimed: Any = await redis.xautoclaim(STREAM, GROUP, LIVE, 60_000, count=2000, justid=True)
        assert claimed == ids

    async def test_nothing_pending_releases_nothing(self, redis: Redis) -> None:
        """A consumer with nothing pending (or no group) releases 0."""
        await deliver(redis, 1)
        assert await release_pending(redis, STREAM, GROUP, "nobody", idle_ms=1000) == 0
        assert await release_pending(redis, OTHER, GROUP, DEAD, idle_ms=1000) == 0


@pytest.mark.redis
class TestRetireConsumer:
    async def test_refused_while_entries_are_pending(self, redis: Redis) -> None:
        """A consumer with pending entries is kept (its entries would be lost with it)."""
        await deliver(redis, 2)
        assert not await retire_consumer(redis, STREAM, GROUP, DEAD)
        assert await consumers(redis) == {DEAD: 2}

    async def test_deleted_once_acked(self, redis: Redis) -> None:
        """Once its entries are acked the consumer is deleted from the group."""
        ids = await deliver(redis, 2)
        await redis.xack(STREAM, GROUP, *ids)
        assert await retire_consumer(redis, STREAM, GROUP, DEAD)
        assert await consumers(redis) == {}

    async def test_missing_group_counts_as_retired(self, redis: Redis) -> None:
        """With no group there is nothing to delete: retired."""
        await redis.xadd(STREAM, {"n": "1"})
        assert await retire_consumer(redis, STREAM, GROUP, DEAD)


@pytest.mark.redis
class TestDeadLetterCrashed:
    """The bot reports the stream of an entry; the group read it in its inbox of it."""

    async def test_writes_a_dead_letter_and_acks(self, redis: Redis) -> None:
        """The entry goes to the DLQ with reason "crashed", the exits and its fields; acked."""
        ids = await deliver(redis, 2, stream=INBOX)
        dlq = DeadLetters(redis, KEYS)
        exits = ["exit 1", "killed by SIGKILL", "exit 1"]
        assert await dead_letter_crashed(
            redis, dlq, group=GROUP, consumer=DEAD, entry=(STREAM, ids[0]), exits=exits
        )
        (letter,) = await dlq.list()
        assert letter.reason == "crashed"
        assert "3 consecutive crashes" in letter.error
        assert "exit 1, killed by SIGKILL, exit 1" in letter.error
        assert letter.attempts == 3
        assert (letter.stream, letter.entry_id) == (STREAM, ids[0])
        assert (letter.group, letter.consumer) == (GROUP, DEAD)
        assert letter.event_id == "event-0"
        assert letter.fields == {"id": "event-0", "type": "user.message.received", "n": "0"}
        assert await pending_of(redis, INBOX, GROUP, DEAD) == ids[1:]

    async def test_entry_gone_from_the_stream_is_only_acked(self, redis: Redis) -> None:
        """An entry deleted from the stream meanwhile writes no dead letter but is acked."""
        ids = await deliver(redis, 1, stream=INBOX)
        await redis.xdel(INBOX, ids[0])
        dlq = DeadLetters(redis, KEYS)
        await dead_letter_crashed(
            redis, dlq, group=GROUP, consumer=DEAD, entry=(STREAM, ids[0]), exits=["exit 1"]
        )
        assert await dlq.list() == []
        assert await pending_of(redis, INBOX, GROUP, DEAD) == []

    async def test_already_acked_entry_returns_false(self, redis: Redis) -> None:
        """An entry no longer pending (acked meanwhile) reports that nothing was acked."""
        ids = await deliver(redis, 1, stream=INBOX)
        await redis.xack(INBOX, GROUP, ids[0])
        dlq = DeadLetters(redis, KEYS)
        assert not await dead_letter_crashed(
            redis, dlq, group=GROUP, consumer=DEAD, entry=(STREAM, ids[0]), exits=["exit 1"]
        )
