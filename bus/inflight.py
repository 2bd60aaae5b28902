"""The entries one consumer has taken and not yet finished, and the room it has for more.

The dispatcher takes entries in (one :class:`~bus.delivery.Delivery` each) and finishes them
when their last handler is done; the reader and the reclaimer wait for room before they take
more from Redis, and the reclaimer asks which entries have been held long enough to claim
again. It is the one place that state lives, so none of them shares a bare dict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from bus.delivery import Delivery
from bus.event import Event


class InFlight:
    """Deliveries taken but not finished, keyed by stream and entry id, at most ``limit``.

    ``limit`` is soft: :meth:`take` never refuses (an entry read is handled), it only closes
    the room the reader and the reclaimer wait for until :meth:`finish` makes some again.
    """

    __slots__ = ("_entries", "_room", "limit")

    def __init__(self, limit: int) -> None:
        #: How many entries may be in flight before readers wait.
        self.limit = limit
        self._entries: dict[tuple[str, str], Delivery] = {}
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, str]) -> bool:
        """Whether the entry ``(stream, entry_id)`` is in flight."""
        return key in self._entries

    @property
    def free(self) -> int:
        """How many more entries fit under the limit (negative when past it)."""
        return self.limit - len(self._entries)

    def take(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[str, str],
        event: Event | None,
        handlers: int,
    ) -> Delivery:
        """Track an entry that ``handlers`` handlers (or one dead-lettering) will finish."""
        delivery = Delivery(stream, entry_id, fields, event, handlers)
        self._entries[(stream, entry_id)] = delivery
        if len(self._entries) >= self.limit:
            self._room.clear()
        return delivery

    def finish(self, delivery: Delivery) -> None:
        """Forget a delivery all of whose handlers are done (acked or left pending)."""
        self._entries.pop((delivery.stream, delivery.entry_id), None)
        if len(self._entries) < self.limit:
            self._room.set()

    async def wait_for_room(self) -> None:
        """Return once fewer than ``limit`` entries are in flight (or :meth:`open` was called)."""
        await self._room.wait()

    def open(self) -> None:
        """Wake everyone waiting for room (the consumer stops: they must see it)."""
        self._room.set()

    def held_longer_than(self, stream: str, seconds: float, now: float) -> list[str]:
        """Ids of the entries of ``stream`` taken more than ``seconds`` before ``now``
        (monotonic clock)."""
        return [
            d.entry_id
            for (s, _), d in self._entries.items()
            if s == stream and now - d.taken_at > seconds
        ]

    def __repr__(self) -> str:
        return f"<InFlight entries={len(self._entries)} limit={self.limit}>"
