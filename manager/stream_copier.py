"""A Redis stream copied into PostgreSQL in batches, acked and deleted after each commit.

The audit log (:mod:`manager.audit`) and the delivery records (:mod:`manager.archive.deliveries`)
reach PostgreSQL this way: the coordinating manager reads the stream with a group of its
own, first what a previous run read and did not ack, then new entries; it decodes each
entry (an entry that is not what it should be is dropped with a log line and holds nothing
up), stores the batch, and only then acks and deletes it. So PostgreSQL being away delays
the copy and loses nothing; a crash between the commit and the ack stores a batch twice,
which the readers of both tables take care of.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.archive.store import ArchiveStore
from bus.backoff import Backoff
from bus.connection import raise_swallowed_cancel
from bus.groups import ensure_group
from bus.redis_errors import is_nogroup

log = structlog.get_logger("manager.stream_copier")

T = TypeVar("T")


class StreamCopier(Generic[T]):
    """Copies ``key`` into PostgreSQL as group ``group``; :meth:`run` until cancelled.

    Subclasses say what an entry holds (:meth:`decode`) and how to store a batch
    (:meth:`store`)."""

    #: What is copied, for log lines ("audit records").
    what = "records"

    def __init__(
        self,
        redis: Redis,
        key: str,
        group: str,
        store: Callable[[], Awaitable[ArchiveStore]],
        *,
        batch: int = 500,
        consumer: str = "copier",
    ) -> None:
        self._redis = redis
        self._key = key
        self._group = group
        self._consumer = consumer
        self._batch = batch
        self._store = store
        self._backoff = Backoff(0.2, 30.0)
        #: Records stored, and records dropped (entries not ours, or refused by PostgreSQL).
        self.copied = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._key} copied={self.copied}>"

    def decode(self, entry_id: str, fields: Mapping[Any, Any]) -> list[T]:
        """The records of one entry; ValueError (KeyError, TypeError) for one not ours."""
        raise NotImplementedError

    async def store(self, store: ArchiveStore, records: Sequence[T]) -> None:
        """Store one batch; raises when PostgreSQL is away (the batch is read again)."""
        raise NotImplementedError

    async def run(self) -> None:
        """Copy, first what a previous run read and did not ack, then new records."""
        failures = 0
        while True:
            raise_swallowed_cancel()  # redis-py on 3.11 can drop a cancel mid-command
            try:
                await ensure_group(self._redis, self._key, self._group, "0")
                while await self.copy_once("0"):
                    raise_swallowed_cancel()  # a previous run's pending records first
                while True:
                    raise_swallowed_cancel()
                    await self.copy_once(">", block_ms=1000)
                    failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if not (isinstance(exc, RedisError) and is_nogroup(exc)):
                    log.warning(f"cannot copy the {self.what}; retrying", stream=self._key,
                                error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                await asyncio.sleep(self._backoff.delay(failures))

    async def copy_once(self, position: str, block_ms: int | None = None) -> int:
        """Read a batch (``"0"``: this consumer's pending, ``">"``: new), store it, ack and
        delete it; how many entries it held."""
        reply: Any = await self._redis.xreadgroup(
            self._group, self._consumer, {self._key: position}, count=self._batch, block=block_ms
        )
        rows = [row for _, entries in (reply or []) for row in entries]
        if not rows:
            return 0
        records: list[T] = []
        ids = []
        for entry_id, fields in rows:
            ids.append(entry_id)
            try:
                records += self.decode(entry_id, fields or {})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.dropped += 1
                log.error(f"{self.what} stream entry is not ours: dropped", stream=self._key,
                          entry_id=entry_id, error=str(exc))  # fmt: skip
        if records:  # PostgreSQL away: raises, and the batch stays pending for the retry
            await self.store(await self._store(), records)
        await self._redis.xack(self._key, self._group, *ids)
        await self._redis.xdel(self._key, *ids)
        return len(rows)
