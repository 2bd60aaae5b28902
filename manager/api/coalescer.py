"""Publishes the events of API requests that arrive together in one Redis pipeline.

Under load, many publish requests are answered in each turn of the event loop; sent one
``XADD`` (or one pipeline) each, every request pays a round trip to Redis and redis-py's
cost per command, which were most of the lean route's time. Here the requests of one turn
join a group, and the group is published with one ``publish_many`` in the next turn: one
pipeline, one write and one read for all of them. Each request still gets its answer only
once Redis confirmed its own events, and its ids in the order it sent them.

What a request sees is what it would see alone, with one exception: when Redis fails
under a pipeline shared by several requests, each of them is answered with that failure,
whose text counts the pipeline's events. A group whose events do not all pass the bus's
checks (a registered schema, the size limit) was not sent at all (``publish_many`` checks
every event first): its requests are then published one by one, so only the invalid one
is refused.
"""

from __future__ import annotations

import asyncio

from bus import BusClient, Event
from bus.errors import EventValidationError

#: Events in one group at most. A request of this many is sent on its own: a pipeline
#: that large already pays for its round trip, and while Redis works through it the
#: manager validates the next request instead of waiting with the whole group.
GROUP_EVENTS = 100


class _Group:
    """The events of the requests of one turn, and the ids Redis confirmed for them (None:
    publish each request alone)."""

    __slots__ = ("done", "drafts")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.drafts: list[Event] = []
        self.done: asyncio.Future[list[str] | None] = loop.create_future()


class PublishCoalescer:
    """``publish_many`` of ``bus``, the calls of one event-loop turn sent together (at most
    ``max_events`` events in one pipeline; a call of that many is sent on its own)."""

    def __init__(self, bus: BusClient, max_events: int = GROUP_EVENTS) -> None:
        self._bus = bus
        self._max = max_events
        self._open: _Group | None = None
        #: The groups being published: referenced until done (see :meth:`publish_many`).
        self._publishing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        waiting = len(self._open.drafts) if self._open is not None else 0
        return f"<PublishCoalescer waiting={waiting} publishing={len(self._publishing)}>"

    async def publish_many(self, drafts: list[Event]) -> list[str]:
        """Publish ``drafts`` with those of the other calls of this turn; their ids once
        Redis confirmed them. Raises what ``BusClient.publish_many`` raises."""
        if len(drafts) >= self._max:
            return await self._bus.publish_many(drafts)
        group = self._open
        if group is None or len(group.drafts) + len(drafts) > self._max:
            loop = asyncio.get_running_loop()
            group = self._open = _Group(loop)
            # A task of its own, not the first caller's: the group's publish must not be
            # cancelled with any one request. It starts in the next turn, once this turn's
            # callers have joined, and every caller awaits its outcome.
            task = loop.create_task(self._publish(group))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
        start = len(group.drafts)
        group.drafts.extend(drafts)
        ids = await asyncio.shield(group.done)
        if ids is None:
            return await self._bus.publish_many(drafts)
        return ids[start : start + len(drafts)]

    async def _publish(self, group: _Group) -> None:
        if self._open is group:
            self._open = None
        try:
            ids = await self._bus.publish_many(group.drafts)
        except EventValidationError:  # nothing was sent: each on its own (see the module)
            group.done.set_result(None)
        except asyncio.CancelledError:
            group.done.cancel()
            raise
        except Exception as exc:
            group.done.set_exception(exc)
        else:
            group.done.set_result(ids)
