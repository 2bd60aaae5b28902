"""The runtime's side of the status pipe: heartbeats, readiness, the entries in flight and
the bus metrics."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import structlog

from bus.event import Event
from bus.metrics import BusMetrics
from bus.supervision import Status, StatusLine

log = structlog.get_logger("bots.runtime")
#: Unsent status bytes kept while the manager does not read; past this, in-flight lines drop.
MAX_BUFFER = 1 << 20
#: Entry ids per in-flight line (a batch handler's events span several short lines).
IDS_PER_LINE = 200


class StatusChannel:
    """Writes status lines to the manager without ever blocking the bot.

    The pipe is non-blocking: what does not fit waits in a buffer for the next write. A
    handler's start is written at once (if the handler then crashes the process, the manager
    must already know the entry); ends are coalesced into one write per loop iteration.
    With no pipe (a bot run by hand) every call does nothing.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._flush_scheduled = False
        self._overflowed = False
        self._head_partial = False
        self._last_metrics: dict[str, Any] | None = None
        #: Set when the manager closed its end: it is gone, and the bot should stop.
        self.closed = asyncio.Event()
        if fd is not None:
            os.set_blocking(fd, False)

    def send(self, line: StatusLine, *, now: bool = True) -> None:
        """Queue ``line``; write it at once, or with the next flush when ``now`` is false."""
        if self._fd is None or self.closed.is_set():
            return
        self._buffer += line.encode()
        if now:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what the pipe takes now; keep the rest for later."""
        self._flush_scheduled = False
        if self._fd is None or not self._buffer:
            return
        try:
            written = os.write(self._fd, self._buffer)
        except BlockingIOError:
            written = 0
        except (BrokenPipeError, OSError) as exc:
            log.warning("status pipe closed: the manager is gone", error=str(exc))
            self._buffer.clear()
            self.closed.set()
            return
        if written:
            # Whether the pipe holds the start of a line whose rest is still buffered.
            self._head_partial = self._buffer[written - 1 : written] != b"\n"
        del self._buffer[:written]
        if len(self._buffer) > MAX_BUFFER:
            if not self._overflowed:
                log.warning("the manager reads no status; dropping in-flight reports")
                self._overflowed = True
            # Keep the rest of a line the pipe took only part of, so lines stay whole.
            end = self._buffer.find(b"\n") + 1 if self._head_partial else 0
            del self._buffer[end:]
        elif not self._buffer:
            self._overflowed = False

    # -- HandlerObserver -----------------------------------------------------------------

    def started(self, events: Sequence[Event]) -> None:
        """Report the entries a handler starts on, before it runs."""
        for stream, ids in _by_stream(events).items():
            for start in range(0, len(ids), IDS_PER_LINE):
                self.send(
                    StatusLine(Status.STARTED, stream, tuple(ids[start : start + IDS_PER_LINE]))
                )

    def finished(self, events: Sequence[Event]) -> None:
        """Report the entries a handler is done with (written with the next flush)."""
        for stream, ids in _by_stream(events).items():
            for start in range(0, len(ids), IDS_PER_LINE):
                chunk = tuple(ids[start : start + IDS_PER_LINE])
                self.send(StatusLine(Status.FINISHED, stream, chunk), now=False)

    def groups_missing(self, streams: Sequence[str], start_id: str) -> None:
        """Ask the manager to create the bot's group on ``streams`` at ``start_id`` (the
        bot's Redis user may not)."""
        if streams:
            self.send(StatusLine(Status.GROUPS, start_id, tuple(streams)))

    def send_metrics(self, metrics: BusMetrics) -> None:
        """Report ``metrics``'s snapshot, unless it is the same as the last one reported."""
        if self._fd is None:
            return
        snapshot = metrics.snapshot()
        if snapshot != self._last_metrics:
            self._last_metrics = snapshot
            self.send(StatusLine(Status.METRICS, data=snapshot))

    async def metrics_reports(self, metrics: BusMetrics, interval: float) -> None:
        """Report ``metrics`` every ``interval`` seconds when it changed, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.send_metrics(metrics)

    async def heartbeats(self, interval: float) -> None:
        """Send a heartbeat every ``interval`` seconds from this event loop, until cancelled."""
        while True:
            self.send(StatusLine(Status.HEARTBEAT))
            await asyncio.sleep(interval)


def _by_stream(events: Sequence[Event]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if event.stream and event.entry_id:
            grouped[event.stream].append(event.entry_id)
    return grouped
