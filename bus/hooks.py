"""What the bot runtime plugs into a consumer: an observer of its handlers, and a fence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bus.event import Event


class HandlerObserver(Protocol):
    """Told synchronously when a handler starts and ends on events (the bot runtime reports
    the entries in flight to the manager, so an entry that crashes the process is known)."""

    def started(self, events: Sequence[Event]) -> None:
        """A handler is about to run on ``events`` (read from a stream: entry ids are set)."""

    def finished(self, events: Sequence[Event]) -> None:
        """The handler started on ``events`` returned or raised."""

    def groups_missing(self, streams: Sequence[str], start_id: str) -> None:
        """The consumer's group is missing on ``streams`` and its Redis user may not create
        it: the bot runtime asks the manager to create it there at ``start_id`` (the
        consumer waits until it exists)."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Whether this process may still act (an active replica holds its lease), asked before
    every handler call: ``valid()`` False means another replica may be active already, so
    no handler runs; ``lost()`` is told (the bot runtime exits there) and the entry stays
    pending for the new active."""

    valid: Callable[[], bool]
    lost: Callable[[], None]
