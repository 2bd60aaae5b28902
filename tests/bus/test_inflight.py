"""The entries a consumer has in flight: tracking, the room for more, what to claim again."""

from __future__ import annotations

import asyncio

from bus.event import Event
from bus.inflight import InFlight


def _event() -> Event:
    return Event(type="order.created", data={}, source="shop", key="k")


class TestTracking:
    def test_take_tracks_the_entry_until_finished(self) -> None:
        """A taken entry is in flight, with its fields, event and handler count, until finished."""
        inflight = InFlight(limit=4)
        event = _event()
        delivery = inflight.take("s", "1-0", {"type": "order.created"}, event, 2)
        assert ("s", "1-0") in inflight
        assert ("other", "1-0") not in inflight
        assert (delivery.stream, delivery.entry_id, delivery.event) == ("s", "1-0", event)
        assert delivery.fields == {"type": "order.created"}
        assert delivery.remaining == 2
        assert len(inflight) == 1
        inflight.finish(delivery)
        assert ("s", "1-0") not in inflight
        assert not inflight

    def test_finishing_twice_is_harmless(self) -> None:
        """Finishing a delivery that is no longer tracked changes nothing."""
        inflight = InFlight(limit=4)
        first = inflight.take("s", "1-0", {"a": "1"}, None, 1)
        inflight.take("s", "2-0", {"a": "2"}, None, 1)
        inflight.finish(first)
        inflight.finish(first)
        assert len(inflight) == 1
        assert ("s", "2-0") in inflight


class TestRoom:
    async def test_room_closes_at_the_limit_and_opens_below_it(self) -> None:
        """Readers wait once ``limit`` entries are in flight and go on when one finishes."""
        inflight = InFlight(limit=2)
        first = inflight.take("s", "1-0", {"a": "1"}, None, 1)
        assert inflight.free == 1
        await asyncio.wait_for(inflight.wait_for_room(), 1)
        inflight.take("s", "2-0", {"a": "2"}, None, 1)
        assert inflight.free == 0
        waiter = asyncio.create_task(inflight.wait_for_room())
        await asyncio.sleep(0)
        assert not waiter.done()
        inflight.finish(first)
        await asyncio.wait_for(waiter, 1)
        assert inflight.free == 1

    async def test_take_past_the_limit_is_never_refused(self) -> None:
        """The limit is soft: entries already read are tracked past it (``free`` goes negative)."""
        inflight = InFlight(limit=1)
        for i in range(3):
            inflight.take("s", f"{i}-0", {"a": "1"}, None, 1)
        assert len(inflight) == 3
        assert inflight.free == -2

    async def test_open_wakes_waiters_while_full(self) -> None:
        """``open`` wakes readers waiting for room (a stop), however full it is."""
        inflight = InFlight(limit=1)
        inflight.take("s", "1-0", {"a": "1"}, None, 1)
        waiter = asyncio.create_task(inflight.wait_for_room())
        await asyncio.sleep(0)
        assert not waiter.done()
        inflight.open()
        await asyncio.wait_for(waiter, 1)


class TestHeldLongerThan:
    def test_lists_entries_of_the_stream_held_past_the_age(self) -> None:
        """Only the entries of that stream taken more than ``seconds`` ago are listed."""
        inflight = InFlight(limit=10)
        old = inflight.take("s", "1-0", {"a": "1"}, None, 1)
        young = inflight.take("s", "2-0", {"a": "2"}, None, 1)
        other = inflight.take("t", "3-0", {"a": "3"}, None, 1)
        old.taken_at, young.taken_at, other.taken_at = 100.0, 108.0, 100.0
        assert inflight.held_longer_than("s", 5.0, now=110.0) == ["1-0"]
        assert inflight.held_longer_than("t", 5.0, now=110.0) == ["3-0"]
        assert inflight.held_longer_than("s", 20.0, now=110.0) == []
