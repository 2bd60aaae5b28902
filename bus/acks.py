"""Acks of one consumer, collected and sent in batches (one XACK per stream per flush)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from redis.asyncio import Redis


class AckBatcher:
    """Collects entry ids to XACK and sends what accumulated while the last flush ran."""

    def __init__(self, redis: Redis, group: str) -> None:
        self._redis = redis
        self._group = group
        self._acks: dict[str, list[str]] = defaultdict(list)
        self.wakeup = asyncio.Event()
        self.acked = 0

    def add(self, stream: str, entry_id: str) -> None:
        """Queue an entry for the next flush."""
        self._acks[stream].append(entry_id)
        self.wakeup.set()

    @property
    def pending(self) -> bool:
        """Whether some acks wait to be sent."""
        return bool(self._acks)

    async def flush(self) -> None:
        """Send the queued acks; on failure keep them (in order) for the next flush."""
        self.wakeup.clear()
        batch, self._acks = self._acks, defaultdict(list)
        if not batch:
            return
        try:
            if len(batch) == 1:  # the common case: one XACK, no pipeline overhead
                ((stream, ids),) = batch.items()
                await self._redis.xack(stream, self._group, *ids)
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for stream, ids in batch.items():
                        pipe.xack(stream, self._group, *ids)
                    await pipe.execute()
        except BaseException:
            for stream, ids in batch.items():
                self._acks[stream][:0] = ids
            raise
        self.acked += sum(len(ids) for ids in batch.values())

    def __repr__(self) -> str:
        return f"<AckBatcher group={self._group} pending={sum(map(len, self._acks.values()))}>"
