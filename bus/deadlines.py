"""Handler timeouts from one watchdog task, not a timer per handler call.

``asyncio.timeout`` schedules and cancels a loop timer for every call: about 5 µs each on
uvloop, a sixth of a core at 30,000 events/s. A consumer's handlers share one
:class:`Deadlines` instead: entering ``limit(timeout)`` only notes the task and its
deadline in a dict; one task wakes every ``timeout / 10`` (at least every second, at most
every 10 ms) and cancels the calls past their deadline. A timeout fires up to a tenth of
itself late, which is what a handler timeout needs (it catches hung handlers, not slow
ones). As with ``asyncio.timeout``, the cancellation becomes a ``TimeoutError`` when it was
ours alone; a cancellation from outside (a shutdown) goes on as ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType

#: Bounds of the watchdog's period, in seconds.
MIN_TICK, MAX_TICK = 0.01, 1.0


class Limit:
    """One handler call under a timeout: ``async with deadlines.limit(5) as limit:``."""

    __slots__ = ("_cancelling", "_deadlines", "_expired", "_task", "_timeout", "deadline", "key")

    def __init__(self, deadlines: Deadlines, timeout: float | None) -> None:
        self._deadlines = deadlines
        self._timeout = timeout
        self._expired = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        #: Loop time past which the call is cancelled (set on entry).
        self.deadline = 0.0
        #: Its place among the running calls.
        self.key = 0

    def expired(self) -> bool:
        """Whether the call ran past its deadline and was cancelled for it."""
        return self._expired

    async def __aenter__(self) -> Limit:
        if self._timeout is not None:
            self._task = task = asyncio.current_task()
            self._cancelling = task.cancelling() if task is not None else 0
            self.deadline = asyncio.get_running_loop().time() + self._timeout
            self._deadlines.watch(self, self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is None:
            return
        self._deadlines.forget(self)
        if (
            self._expired
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    def cancel_late(self) -> None:
        """Cancel the call: it is past its deadline (the watchdog calls this once)."""
        if self._task is not None and not self._expired:
            self._expired = True
            self._task.cancel()


class Deadlines:
    """The running calls of one consumer and the watchdog that cancels late ones."""

    def __init__(self) -> None:
        self._calls: dict[int, Limit] = {}
        self._keys = itertools.count(1)
        self._tick = MAX_TICK
        self._watchdog: asyncio.Task[None] | None = None

    def limit(self, timeout: float | None) -> Limit:
        """A limit of ``timeout`` seconds (None: none) for one call."""
        return Limit(self, timeout)

    def watch(self, call: Limit, timeout: float) -> None:
        """Note a call that entered its limit (from :class:`Limit`)."""
        call.key = next(self._keys)
        self._calls[call.key] = call
        self._tick = min(self._tick, max(MIN_TICK, timeout / 10))
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def forget(self, call: Limit) -> None:
        """The call left its limit."""
        self._calls.pop(call.key, None)

    async def _watch(self) -> None:
        """Cancel late calls until none runs (the next call starts it again)."""
        loop = asyncio.get_running_loop()
        while self._calls:
            await asyncio.sleep(self._tick)
            now = loop.time()
            for call in [c for c in self._calls.values() if now >= c.deadline]:
                call.cancel_late()
        self._tick = MAX_TICK

    def __repr__(self) -> str:
        return f"<Deadlines calls={len(self._calls)} tick={self._tick:g}s>"
