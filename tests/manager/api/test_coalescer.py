"""Publishing the API's requests of one event-loop turn together (:mod:`manager.api.coalescer`),
on a real bus client of the test's Redis whose ``publish_many`` calls are recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusClient, Event
from bus.errors import BusConnectionError, EventValidationError
from manager.api.coalescer import PublishCoalescer
from tests.conftest import BusFactory

pytestmark = [pytest.mark.redis, pytest.mark.one_redis]

TYPE = "test.coalesced.sent"


class Recorded:
    """The bus client, its ``publish_many`` calls recorded by size (then made for real,
    unless ``failure`` is set: then it raises that)."""

    def __init__(self, bus: BusClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bus = bus
        self.sizes: list[int] = []
        self.failure: Exception | None = None
        real = bus.publish_many

        async def publish_many(drafts: list[Event]) -> list[str]:
            self.sizes.append(len(drafts))
            if self.failure is not None:
                raise self.failure
            return await real(drafts)

        monkeypatch.setattr(bus, "publish_many", publish_many)

    def drafts(self, count: int, **data: Any) -> list[Event]:
        return [self.bus.event(TYPE, {"n": n, **data}) for n in range(count)]

    async def stored(self, redis: Redis) -> list[str]:
        """The ids of the events in the stream, oldest first."""
        entries: Any = await redis.xrange(self.bus.keys.stream(self.bus.router.target(TYPE, None)))
        return [fields["id"] for _, fields in entries]


@pytest.fixture
async def recorded(bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    return Recorded(await bus_factory("api", max_event_bytes=256), monkeypatch)


class TestGroups:
    async def test_the_calls_of_one_turn_go_in_one_pipeline(
        self, recorded: Recorded, redis: Redis
    ) -> None:
        """Five calls made together: one publish_many of all their events; each call gets
        its own events' ids, in its order."""
        coalescer = PublishCoalescer(recorded.bus)
        calls = [recorded.drafts(size, call=c) for c, size in enumerate((1, 2, 3, 1, 1))]
        answers = await asyncio.gather(*(coalescer.publish_many(d) for d in calls))
        assert recorded.sizes == [8]
        assert answers == [[e.id for e in drafts] for drafts in calls]
        assert await recorded.stored(redis) == [e.id for drafts in calls for e in drafts]

    async def test_groups_hold_at_most_max_events_and_a_full_call_goes_alone(
        self, recorded: Recorded
    ) -> None:
        """Past max_events a new group starts; a call of max_events or more is sent on
        its own, at once."""
        coalescer = PublishCoalescer(recorded.bus, max_events=4)
        await asyncio.gather(*(coalescer.publish_many(recorded.drafts(2)) for _ in range(3)))
        assert recorded.sizes == [4, 2]
        recorded.sizes.clear()
        await asyncio.gather(
            coalescer.publish_many(recorded.drafts(1)), coalescer.publish_many(recorded.drafts(4))
        )
        assert recorded.sizes == [4, 1]

    async def test_calls_in_later_turns_make_new_groups(self, recorded: Recorded) -> None:
        """One call at a time: one publish each, nothing waits for company."""
        coalescer = PublishCoalescer(recorded.bus)
        for _ in range(3):
            await coalescer.publish_many(recorded.drafts(1))
        assert recorded.sizes == [1, 1, 1]
        assert repr(coalescer) == "<PublishCoalescer waiting=0 publishing=0>"


class TestFailures:
    async def test_an_invalid_event_refuses_only_its_own_call(
        self, recorded: Recorded, redis: Redis
    ) -> None:
        """An event over the size limit in a group: nothing of the group was sent, so each
        call is published alone; only the invalid one raises."""
        coalescer = PublishCoalescer(recorded.bus)
        good, bad, other = (
            recorded.drafts(2),
            recorded.drafts(1, blob="x" * 300),
            recorded.drafts(1),
        )
        answers = await asyncio.gather(
            *(coalescer.publish_many(d) for d in (good, bad, other)), return_exceptions=True
        )
        assert answers[0] == [e.id for e in good]
        assert isinstance(answers[1], EventValidationError)
        assert answers[2] == [e.id for e in other]
        assert recorded.sizes == [4, 2, 1, 1]
        assert sorted(await recorded.stored(redis)) == sorted(e.id for e in good + other)

    async def test_a_failure_of_the_pipeline_reaches_every_call(self, recorded: Recorded) -> None:
        """Redis failing under a group: each of its calls raises that failure."""
        coalescer = PublishCoalescer(recorded.bus)
        recorded.failure = BusConnectionError("could not publish 3 event(s): Redis is away")
        answers = await asyncio.gather(
            *(coalescer.publish_many(recorded.drafts(1)) for _ in range(3)), return_exceptions=True
        )
        assert answers == [recorded.failure] * 3
        assert recorded.sizes == [3]

    async def test_a_cancelled_call_leaves_its_group_published(
        self, recorded: Recorded, redis: Redis
    ) -> None:
        """One caller cancelled while its group waits: the others get their ids, and the
        group (its events too) is published all the same."""
        coalescer = PublishCoalescer(recorded.bus)
        calls = [recorded.drafts(1, call=c) for c in range(3)]
        tasks = [asyncio.ensure_future(coalescer.publish_many(d)) for d in calls]
        await asyncio.sleep(0)  # each has joined the group
        tasks[1].cancel()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(answers[1], asyncio.CancelledError)
        assert [answers[0], answers[2]] == [[calls[0][0].id], [calls[2][0].id]]
        assert await recorded.stored(redis) == [d[0].id for d in calls]
