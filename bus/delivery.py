"""One stream entry a consumer took, on its way through the handlers to its ack."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bus.event import Event


@dataclass(eq=False, slots=True)
class Delivery:
    """One stream entry being handled; acked once every matching handler is done with it."""

    stream: str
    entry_id: str
    fields: Mapping[str, str]
    event: Event | None
    remaining: int = 1
    taken_at: float = field(default_factory=time.monotonic)
    #: Whether a handler started on it (it is counted as consumed once).
    consumed: bool = False
    #: Whether some outcome could not be made final (a dead letter not stored, the run-once
    #: marker unreadable, a bug): then it is not acked, and is delivered again later.
    keep: bool = False
    #: How many times Redis has delivered it to the group (1 for a new entry).
    attempts: int = 1
    #: The consumer it was taken over from ("" if none).
    previous: str = ""
    #: Seconds its handlers ran, in all.
    handler_s: float = 0.0
    #: Whether some handler's dead letter for it was stored.
    dead_lettered: bool = False
    #: Whether a dead-letter retry sent it to this group alone.
    retry: bool = False
