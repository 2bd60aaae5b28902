"""Acks of one consumer, collected and sent in batches (one XACK per stream per flush),
each flush with the delivery records that wait (:mod:`bus.delivery_records`)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.connection import is_cluster
from bus.delivery_records import DeliveryRecords
from bus.held_connection import HeldConnection
from bus.metrics import GroupMetrics


class AckBatcher:
    """Collects entry ids to XACK and sends what accumulated while the last flush ran.

    Entries added with their event type are counted in ``meter`` once their XACK is sent.
    """

    def __init__(
        self,
        redis: Redis,
        group: str,
        meter: GroupMetrics | None = None,
        records: DeliveryRecords | None = None,
    ) -> None:
        self._redis = redis
        #: The connection a lone XACK goes on (see :mod:`bus.held_connection`).
        self._held = HeldConnection(redis)
        self._records = records
        self._group = group
        self._meter = meter
        self._acks: dict[str, list[str]] = defaultdict(list)
        # The metered entries, pairwise: their ids and event types ("" if they did not decode).
        self._metered_ids: list[str] = []
        self._metered_types: list[str] = []
        self.wakeup = asyncio.Event()
        self.acked = 0
        #: Flushes under way: their acks are neither waiting nor sent yet.
        self._flushing = 0
        # One flush at a time: a stop's last flush waits for the one on its way.
        self._one_at_a_time = asyncio.Lock()
        # Records and acks go in one transaction when they can: one client (one Redis user
        # may write the outbox and ack the group), and not a cluster (the outbox and the
        # streams sit in different hash slots).
        self._together = records is not None and records.redis is redis and not is_cluster(redis)

    def add(self, stream: str, entry_id: str, event_type: str | None = None) -> None:
        """Queue an entry for the next flush; with ``event_type``, count it as handled."""
        self._acks[stream].append(entry_id)
        if event_type is not None and self._meter is not None:
            self._metered_ids.append(entry_id)
            self._metered_types.append(event_type)
        self.wakeup.set()

    @property
    def pending(self) -> bool:
        """Whether some acks (or delivery records) wait to be sent, or are being sent: a
        stop must not take a flush in flight for done, and cancel it."""
        return bool(self._acks) or bool(self._records) or self._flushing > 0

    async def flush(self) -> None:
        """Send the delivery records with the queued acks; on failure keep both (in order)
        for the next flush. Flushes run one at a time: when one returns, every flush begun
        before it has ended (sent, or failed with its acks waiting again)."""
        self._flushing += 1
        try:
            async with self._one_at_a_time:
                await self._flush()
        finally:
            self._flushing -= 1

    async def _flush(self) -> None:
        self.wakeup.clear()
        # Taken before the records are: every ack taken has its record among the ones
        # waiting now (a record is kept before its entry's ack is queued).
        batch, self._acks = self._acks, defaultdict(list)
        metered_ids, metered_types = self._metered_ids, self._metered_types
        self._metered_ids, self._metered_types = [], []
        try:
            if self._records and self._together:
                await self._send_together(self._records, batch)
            else:
                if self._records:
                    await self._records.flush()  # first: an entry acked always has its record
                await self._send_acks(batch)
        except BaseException:
            for stream, ids in batch.items():
                self._acks[stream][:0] = ids
            self._metered_ids[:0] = metered_ids
            self._metered_types[:0] = metered_types
            raise
        self.acked += sum(len(ids) for ids in batch.values())
        if metered_ids and self._meter is not None:
            self._meter.acked(metered_types, metered_ids)

    async def _send_together(self, records: DeliveryRecords, batch: dict[str, list[str]]) -> None:
        """The records and the acks in one MULTI/EXEC: a consumer killed mid-flush leaves
        both or neither, never an outcome recorded for an entry still pending (which would
        be handled and recorded again). A transaction Redis refuses outright (out of memory
        refuses the XADD, so the whole of it) drops the records and sends the acks alone."""
        chunks = records.take()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for chunk in chunks:
                    records.queue(pipe, chunk)
                for stream, ids in batch.items():
                    pipe.xack(stream, self._group, *ids)
                results = await pipe.execute(raise_on_error=False)
        except ResponseError as exc:
            records.refused(chunks, exc)
            await self._send_acks(batch)
            return
        except BaseException:
            records.put_back(chunks)
            raise
        for chunk, result in zip(chunks, results, strict=False):
            if isinstance(result, ResponseError):
                records.refused([chunk], result)
            else:
                records.written(chunk)
        for result in results[len(chunks) :]:
            if isinstance(result, Exception):
                raise result

    async def _send_acks(self, batch: dict[str, list[str]]) -> None:
        if len(batch) == 1:  # the common case: one XACK, no pipeline overhead
            ((stream, ids),) = batch.items()
            await self._held.execute_command("XACK", stream, self._group, *ids)
        elif batch:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, ids in batch.items():
                    pipe.xack(stream, self._group, *ids)
                await pipe.execute()

    async def close(self) -> None:
        """Give back the connection acks were sent on."""
        await self._held.release()

    def __repr__(self) -> str:
        return f"<AckBatcher group={self._group} pending={sum(map(len, self._acks.values()))}>"
