"""Waiting for entries on several streams of a Redis Cluster.

One blocking ``XREAD`` may only name keys of one hash slot, so on a cluster a wait over
many streams is one blocking read per stream. Cancelling a blocked read costs its
connection, so the reads are kept running across rounds until they answer:
:meth:`StreamWatch.ready` starts the missing ones, waits for the first to answer and
leaves the others blocked for the next round.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.client import NEVER_DECODE


class StreamWatch:
    """Blocking reads kept per stream key (see the module's doc)."""

    def __init__(self, redis: Redis, block_ms: int) -> None:
        self._redis = redis
        self._block_ms = block_ms
        self._reads: dict[str, asyncio.Task[Any]] = {}

    def __repr__(self) -> str:
        return f"<StreamWatch reads={len(self._reads)}>"

    async def ready(self, after: dict[str, str]) -> tuple[list[str], dict[str, BaseException]]:
        """Of the streams in ``after`` (key → the entry id to read after), those with an
        entry beyond it, waiting up to the block time for one; and the reads that failed,
        by key, for the caller to judge (a ``WRONGTYPE``, say). A read started in an earlier
        round may answer for an older position: the caller reads again and finds less."""
        for key in set(self._reads) - set(after):
            self._reads.pop(key).cancel()
        for key, position in after.items():
            if key not in self._reads:
                self._reads[key] = asyncio.ensure_future(self._read(key, position))
        if not self._reads:
            return [], {}
        done, _ = await asyncio.wait(
            self._reads.values(),
            timeout=self._block_ms / 1000 + 1,
            return_when=asyncio.FIRST_COMPLETED,
        )
        ready: list[str] = []
        failed: dict[str, BaseException] = {}
        for key, task in list(self._reads.items()):
            if task not in done:
                continue
            del self._reads[key]
            if task.cancelled():
                continue
            if (error := task.exception()) is not None:
                failed[key] = error
            elif task.result():
                ready.append(key)
        return ready, failed

    async def _read(self, key: str, position: str) -> Any:
        # Never decoded: only whether there is an entry counts, and it need not be UTF-8.
        return await self._redis.execute_command(  # type: ignore[no-untyped-call]
            "XREAD", "COUNT", 1, "BLOCK", self._block_ms, "STREAMS", key, position,
            **{NEVER_DECODE: True},
        )  # fmt: skip

    def close(self) -> None:
        """Cancel the reads kept between rounds."""
        for task in self._reads.values():
            task.cancel()
        self._reads.clear()
