"""Delivery records on their way into PostgreSQL during a bench phase: copied, lag, backlog.

With ``--deliveries`` the bench runs the manager's
:class:`~manager.archive.deliveries.DeliveriesCopier` in its main process, next to the relay and
the fanout, as the coordinating manager does. :class:`CopyWatch` runs it, samples the
backlog every half second (the deliveries stream, and the consumer bot's outbox the relay
empties into it), and once the phase is over waits until the copier stored a record of
every delivery the consumers handled, then measures what the records take on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.archive.store import ArchiveStore
from bus.keys import Keys
from manager.archive.deliveries import DeliveriesCopier
from manager.bench.database import deliveries_disk_bytes
from manager.bench.options import CONSUMER_BOT

log = structlog.get_logger("manager.bench")

#: Seconds between two samples of the backlog.
SAMPLE_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What became of the delivery records of one phase."""

    #: Deliveries the phase's consumers handled, warmup and drain included: each owes a record.
    handled: int
    #: Records stored in PostgreSQL.
    copied: int
    #: Records the copier dropped (not well formed, or refused by PostgreSQL).
    dropped: int
    #: Seconds from the phase's last handled event to the copier's last stored batch (its
    #: entries acked and deleted); None if it stalled before copying ``handled`` records.
    lag_s: float | None
    #: The largest length sampled of the deliveries stream (the copier's backlog) and of
    #: the consumer bot's outbox (the relay's), during the phase and its copy.
    stream_backlog_max: int
    outbox_backlog_max: int
    #: Entries still in the deliveries stream and in the outbox at the end.
    left_in_stream: int
    left_in_outbox: int
    #: Bytes of the ``deliveries`` partitions (with indexes, TOAST, free space maps).
    disk_bytes: int

    @property
    def bytes_per_delivery(self) -> float | None:
        """Disk bytes per copied record; None when nothing was copied."""
        return self.disk_bytes / self.copied if self.copied else None

    @property
    def disk_bytes_per_million(self) -> float | None:
        """Disk bytes per million copied records."""
        per = self.bytes_per_delivery
        return None if per is None else per * 1e6

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` fields (prefixed ``records_`` by the report)."""
        per, lag = self.bytes_per_delivery, self.lag_s
        return {
            "handled": self.handled,
            "copied": self.copied,
            "dropped": self.dropped,
            "copy_lag_s": None if lag is None else round(lag, 3),
            "stream_backlog_max": self.stream_backlog_max,
            "outbox_backlog_max": self.outbox_backlog_max,
            "left_in_stream": self.left_in_stream,
            "left_in_outbox": self.left_in_outbox,
            "disk_bytes": self.disk_bytes,
            "bytes_per_delivery": None if per is None else round(per, 1),
            "disk_bytes_per_million": None if per is None else round(per * 1e6),
        }


class _TimedCopier(DeliveriesCopier):
    """The manager's copier, noting when it last stored records and waking a waiter."""

    def __init__(self, redis: Redis, keys: Keys, store: ArchiveStore) -> None:
        async def archive() -> ArchiveStore:
            return store

        super().__init__(redis, keys, archive)
        #: Wall-clock time the last batch holding records was stored, acked and deleted.
        self.last_copy_at = 0.0
        self.progress = asyncio.Event()

    async def copy_once(self, position: str, block_ms: int | None = None) -> int:
        before = self.copied
        entries = await super().copy_once(position, block_ms)
        if self.copied > before:
            self.last_copy_at = time.time()
            self.progress.set()
        return entries


class CopyWatch:
    """Runs the deliveries copier for a phase and measures it (see the module)."""

    def __init__(self, redis: Redis, keys: Keys, store: ArchiveStore) -> None:
        self._redis = redis
        self._store = store
        self._stream = keys.deliveries()
        self._outbox = keys.outbox(CONSUMER_BOT)
        self._copier = _TimedCopier(redis, keys, store)
        self._stream_max = self._outbox_max = 0

    def __repr__(self) -> str:
        return f"<CopyWatch {self._stream} copied={self._copier.copied}>"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CopyWatch]:
        """Copy and sample the backlog while the block runs."""
        tasks = [asyncio.create_task(self._copier.run()), asyncio.create_task(self._sample())]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def settle(self, handled: int, last_handled: float, stall: float) -> CopyResult:
        """Wait until ``handled`` records are copied, or none was for ``stall`` seconds;
        the result, with the lag measured from ``last_handled`` (wall-clock seconds)."""
        copier = self._copier
        while copier.copied < handled:
            copier.progress.clear()
            try:
                await asyncio.wait_for(copier.progress.wait(), stall)
            except TimeoutError:
                log.warning("bench deliveries copy stalled", handled=handled,
                            copied=copier.copied, dropped=copier.dropped)  # fmt: skip
                break
        drained = copier.copied >= handled
        left_stream, left_outbox = await self._lengths()
        return CopyResult(
            handled=handled,
            copied=copier.copied,
            dropped=copier.dropped,
            lag_s=copier.last_copy_at - last_handled if drained and handled else None,
            stream_backlog_max=max(self._stream_max, left_stream),
            outbox_backlog_max=max(self._outbox_max, left_outbox),
            left_in_stream=left_stream,
            left_in_outbox=left_outbox,
            disk_bytes=await deliveries_disk_bytes(self._store),
        )

    async def _sample(self) -> None:
        """Keep the largest backlog lengths seen, every :data:`SAMPLE_INTERVAL` seconds."""
        while True:
            try:
                stream, outbox = await self._lengths()
            except (RedisError, OSError) as exc:  # a sample missed, not a failed run
                log.warning("bench backlog sample failed", error=str(exc))
            else:
                self._stream_max = max(self._stream_max, stream)
                self._outbox_max = max(self._outbox_max, outbox)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _lengths(self) -> tuple[int, int]:
        """XLEN of the deliveries stream and of the consumer bot's outbox."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._stream)
            pipe.xlen(self._outbox)
            stream, outbox = await pipe.execute()
        return int(stream), int(outbox)
