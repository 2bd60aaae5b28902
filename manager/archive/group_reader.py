"""The archiver's reads: its group's entries on every stream of the namespace.

Which streams there are is looked up now and then (a new route, a new partition), and
the archiver's group is joined on each from its start: what is in Redis when the
archiver first comes is archived. The entries come as Redis sends them (no dict per
entry), so their fields go straight into rows; the client is one of the reader's own, so
no one else's replies change. On a Redis Cluster, where one XREADGROUP cannot span the
streams' slots, each stream is read on its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.connection import is_cluster, separate_client
from bus.groups import ensure_group
from bus.keys import ARCHIVER_CONSUMER, ARCHIVER_GROUP, Keys
from bus.redis_errors import UNAVAILABLE, is_nogroup
from manager.archive.batch import Entries
from manager.config import ArchiveSettings
from manager.observe.lag import stream_keys

log = structlog.get_logger("manager.archive.archiver")
_DISCOVER_EVERY = 5.0  # seconds between looks for new streams


class GroupReader:
    """Reads the archiver group's entries (see the module)."""

    def __init__(self, redis: Redis, keys: Keys, settings: ArchiveSettings) -> None:
        self._redis = redis
        self._client, self._owns_client = separate_client(redis)
        self._client.set_response_callback("XREADGROUP", _as_sent)
        self._cluster = is_cluster(redis)
        self._keys = keys
        self._settings = settings
        #: The streams read (the dead-letter stream among them).
        self.streams: list[str] = []
        self._discovered = 0.0

    def __repr__(self) -> str:
        return f"<GroupReader streams={len(self.streams)}>"

    def forget(self) -> None:
        """Look the streams up again before the next read (after an error)."""
        self.streams = []

    async def close(self) -> None:
        """Close the reader's own client."""
        if self._owns_client:
            await self._client.aclose()

    async def discover(self, force: bool = False) -> None:
        """Find the namespace's streams (new routes appear) and join the new ones with the
        archiver's group; every few seconds, or now with ``force``."""
        now = time.monotonic()
        if not force and now - self._discovered < _DISCOVER_EVERY and self.streams:
            return
        self._discovered = now
        streams = [*await stream_keys(self._redis, self._keys), self._keys.dead_letters()]
        for stream in streams:
            if stream not in self.streams:
                await self._join(stream)
        self.streams = streams

    async def _join(self, stream: str) -> None:
        # From the start: what is in Redis when the archiver first comes is archived.
        if await ensure_group(self._redis, stream, ARCHIVER_GROUP, "0"):
            log.info("archiving a new stream", stream=stream)

    async def read(self, ids: dict[str, str] | None = None) -> Entries:
        """One batch: new entries (up to batch_size, waiting at most batch_wait for the
        first), or with ``ids`` our pending ones after those ids, per stream."""
        if not self.streams:
            await self.discover(force=True)
        positions: Any = ids if ids is not None else dict.fromkeys(self.streams, ">")
        response: Any
        try:
            if self._cluster:
                response = await self._read_each(positions, waiting=ids is None)
            else:
                response = await self._client.xreadgroup(
                    ARCHIVER_GROUP,
                    ARCHIVER_CONSUMER,
                    positions,
                    count=self._settings.batch_size,
                    block=None if ids is not None else int(self._settings.batch_wait * 1000),
                )
        except Exception as exc:
            if is_nogroup(exc):  # Redis lost a stream or our group: join again
                self.streams = []
                return []
            if isinstance(exc, UNAVAILABLE):
                log.warning("redis unavailable; the archiver waits", error=str(exc))
                await asyncio.sleep(1.0)
                return []
            raise
        streams = response.items() if isinstance(response, dict) else response or []  # RESP3/2
        return [
            (stream, [(entry_id, fields or []) for entry_id, fields in rows])
            for stream, rows in streams
            if rows
        ]

    async def _read_each(self, positions: dict[str, str], *, waiting: bool) -> list[Any]:
        """:meth:`read` on a cluster, where one XREADGROUP cannot span the streams' slots:
        one per stream, all at once, none blocking (a blocked one would hold the batch back
        from the others); when all come back empty, it waits ``batch_wait`` before the
        next round, as a blocking read would."""
        count = max(1, self._settings.batch_size // max(1, len(positions)))
        replies = await asyncio.gather(
            *(
                self._client.xreadgroup(
                    ARCHIVER_GROUP, ARCHIVER_CONSUMER, {stream: position}, count=count
                )
                for stream, position in positions.items()
            ),
            return_exceptions=True,
        )
        found: list[Any] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
            streams: Any = reply.items() if isinstance(reply, dict) else reply or []
            found += [(stream, rows) for stream, rows in streams if rows]
        if not found and waiting:
            await asyncio.sleep(self._settings.batch_wait)
        return found


def _as_sent(response: Any, **_: Any) -> Any:
    return response
