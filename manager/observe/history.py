"""The last quarter of an hour, kept in the manager for the status page's charts.

Every ``interval`` seconds the manager takes one sample of its status: the streams'
throughput, the dead letters waiting, the memory used against the budget, and each
consumer group's lag (entries not yet read plus read and not acked). The samples of the
last ``window`` seconds stay in memory (180 of them by default: a few tens of kilobytes);
nothing is written anywhere, so a restarted manager starts a new history.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.connection import raise_swallowed_cancel

log = structlog.get_logger("manager.observe.history")

#: Groups charted at most (the ones furthest behind in the last sample).
MAX_GROUPS = 8


@dataclass(frozen=True, slots=True)
class Sample:
    """The fleet at one moment."""

    at: float  # Unix time, seconds
    events_per_s: float | None
    dead_letters: int | None
    memory_used: int | None
    memory_budget: int | None
    #: ``stream/group`` → lag plus pending.
    lag: dict[str, int] = field(default_factory=dict)


class History:
    """Samples of the last ``window`` seconds, one each ``interval``."""

    def __init__(self, window: float = 900.0, interval: float = 5.0) -> None:
        self.window = window
        self.interval = interval
        self._samples: deque[Sample] = deque(maxlen=max(2, int(window / interval) + 1))

    def __repr__(self) -> str:
        return f"<History {len(self._samples)} samples every {self.interval} s>"

    def add(self, status: Any) -> Sample:
        """One sample from an API status document (``ApiStatus``)."""
        memory = status.memory
        sample = Sample(
            at=round(time.time(), 3),
            events_per_s=status.throughput.events_per_s,
            dead_letters=status.dead_letters,
            memory_used=memory.used if memory else None,
            memory_budget=memory.budget if memory else None,
            lag={f"{g.stream}/{g.group}": (g.lag or 0) + (g.pending or 0) for g in status.groups},
        )
        self._samples.append(sample)
        return sample

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first."""
        return list(self._samples)

    def charted_groups(self) -> list[str]:
        """The groups to chart: those furthest behind at the last sample, then by name."""
        if not self._samples:
            return []
        last = self._samples[-1].lag
        ranked = sorted(last, key=lambda g: (-last[g], g))
        return ranked[:MAX_GROUPS]

    async def run(self, status: Callable[[], Awaitable[Any]]) -> None:
        """Sample every ``interval`` until cancelled (a failed look is skipped, logged)."""
        while True:
            raise_swallowed_cancel()  # the status reads Redis: redis-py can drop a cancel
            started = time.monotonic()
            try:
                self.add(await status())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot sample the status for its history", error=str(exc))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
