"""Batches for batch subscriptions: up to ``batch_size`` events or ``batch_wait`` seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

from bus.delivery import Delivery
from bus.subscription import Subscription

RunBatch = Callable[[Subscription, Sequence[Delivery]], Awaitable[None]]


class Batcher:
    """Collects deliveries for one batch subscription and runs them in arrival order."""

    def __init__(self, sub: Subscription, run_batch: RunBatch) -> None:
        assert sub.batch_size is not None
        self._sub = sub
        self._size = sub.batch_size
        self._run_batch = run_batch
        self._items: list[Delivery] = []
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()

    def add(self, delivery: Delivery) -> None:
        """Queue a delivery for the next batch."""
        self._items.append(delivery)
        self._has_items.set()
        if len(self._items) >= self._size:
            self._full.set()

    def flush_now(self) -> None:
        """Run what is queued without waiting for the batch to fill (used on stop)."""
        self._full.set()

    async def run(self) -> None:
        """Run batches until cancelled."""
        while True:
            await self._has_items.wait()
            if len(self._items) < self._size:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._sub.batch_wait)
            batch, self._items = self._items[: self._size], self._items[self._size :]
            if not self._items:
                self._has_items.clear()
            if len(self._items) < self._size:
                self._full.clear()
            if batch:
                await self._run_batch(self._sub, batch)

    def __repr__(self) -> str:
        return f"<Batcher {self._sub.name} queued={len(self._items)} size={self._size}>"
