"""The archiver's reads: its group's entries on every stream of the namespace.

Which streams there are is looked up now and then (a new route, a new partition), and
the archiver's group is joined on each from its start: what is in Redis when the
archiver first comes is archived. The entries come as Redis sends them (no dict per
entry), so their fields go straight into rows; the client is one of the reader's own, so
no one else's replies change. On a Redis Cluster, where one XREADGROUP cannot span the
streams' slots, each stream is read on its own.

Several archivers may read one group (``archive.on_every_host``: one per manager, each its
own consumer name): Redis hands each entry to one of them, and :meth:`GroupReader.claim`
takes over the entries a dead one had read and never acked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.connection import is_cluster, separate_client
from bus.entry_id import EntryId
from bus.groups import ensure_group
from bus.held_connection import HeldConnection
from bus.keys import ARCHIVER_CONSUMER, ARCHIVER_GROUP, Keys
from bus.lease import run_script
from bus.redis_errors import UNAVAILABLE, is_nogroup
from manager.archive.batch import Entries
from manager.config import ArchiveSettings
from manager.observe.lag import stream_keys

log = structlog.get_logger("manager.archive.archiver")
_DISCOVER_EVERY = 5.0  # seconds between looks for new streams


class GroupReader:
    """Reads the archiver group's entries (see the module)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: ArchiveSettings,
        consumer: str = ARCHIVER_CONSUMER,
    ) -> None:
        self._redis = redis
        #: This archiver's consumer name in the group.
        self.consumer = consumer
        self._client, self._owns_client = separate_client(redis)
        self._client.set_response_callback("XREADGROUP", _as_sent)
        self._client.set_response_callback("XAUTOCLAIM", _as_sent)
        self._cluster = is_cluster(redis)
        #: The connection the blocking reads hold, tried once each (None on a cluster).
        self._held = None if self._cluster else HeldConnection(self._client)
        #: Per stream, the newest entry id this archiver took (read or claimed).
        self._last_taken: dict[str, str] = {}
        #: A read failed: its reply may have been lost with entries in it.
        self._unsure = False
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
        """Give the held connection back, close the reader's own client."""
        if self._held is not None:
            await self._held.release()
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

    async def read(
        self, ids: dict[str, str] | None = None, *, wait: float | None = None
    ) -> Entries:
        """One batch: new entries (up to batch_size, waiting at most ``wait`` seconds,
        batch_wait by default, for the first), or with ``ids`` our pending ones after those
        ids, per stream.

        After a read that failed, new entries wait until the entries its lost reply may
        have held are read again: Redis makes a read's entries pending as it sends the
        reply, so they wait under this archiver's name, past the newest entry it took,
        where nothing else would take them before ``claim_idle``."""
        wait = self._settings.batch_wait if wait is None else wait
        if not self.streams:
            await self.discover(force=True)
        if ids is None and self._unsure:
            self._unsure = False  # set again if this read fails, or finds some
            after = {stream: self._last_taken.get(stream, "0") for stream in self.streams}
            if retaken := await self.read(after):
                self._unsure = True  # until a read after them finds none
                log.info(
                    "took again the entries a lost read reply held",
                    consumer=self.consumer,
                    entries=sum(len(rows) for _, rows in retaken),
                )
                return retaken
            if self._unsure:  # that read failed
                return []
        positions: Any = ids if ids is not None else dict.fromkeys(self.streams, ">")
        response: Any
        try:
            if self._cluster:
                response = await self._read_each(positions, wait=None if ids is not None else wait)
            elif ids is not None:
                response = await self._client.xreadgroup(
                    ARCHIVER_GROUP, self.consumer, positions, count=self._settings.batch_size
                )
            else:
                response = await self._read_new(positions, wait)
        except Exception as exc:
            if is_nogroup(exc):  # Redis lost a stream or our group: join again
                self.streams = []
                self._last_taken.clear()  # a group made anew hands out older ids again
                return []
            self._unsure = True
            if isinstance(exc, UNAVAILABLE):
                log.warning("redis unavailable; the archiver waits", error=str(exc))
                await asyncio.sleep(1.0)
                return []
            raise
        streams = response.items() if isinstance(response, dict) else response or []  # RESP3/2
        found = [
            (stream, [(entry_id, fields or []) for entry_id, fields in rows])
            for stream, rows in streams
            if rows
        ]
        for stream, rows in found:
            self._note_taken(_text(stream), _text(rows[-1][0]))  # rows come in entry order
        return found

    async def _read_new(self, positions: dict[str, str], wait: float) -> Any:
        """A blocking XREADGROUP of new entries on the held connection, tried once: a
        failure must reach :meth:`read` (the retry policy would read anew past a lost
        reply's entries)."""
        assert self._held is not None
        return await self._held.execute_once(
            "XREADGROUP", "GROUP", ARCHIVER_GROUP, self.consumer,
            "COUNT", self._settings.batch_size, "BLOCK", max(1, int(wait * 1000)),
            "STREAMS", *positions, *positions.values(),
        )  # fmt: skip

    def _note_taken(self, stream: str, entry_id: str) -> None:
        """Move the newest entry taken on ``stream`` up to ``entry_id`` if it is newer."""
        known = self._last_taken.get(stream)
        if known is None or EntryId.parse(entry_id) > EntryId.parse(known):
            self._last_taken[stream] = entry_id

    async def _read_each(self, positions: dict[str, str], *, wait: float | None) -> list[Any]:
        """:meth:`read` on a cluster, where one XREADGROUP cannot span the streams' slots:
        one per stream, all at once, none blocking (a blocked one would hold the batch back
        from the others); when all come back empty, it waits ``wait`` (if any) before the
        next round, as a blocking read would."""
        count = max(1, self._settings.batch_size // max(1, len(positions)))
        replies = await asyncio.gather(
            *(
                self._client.xreadgroup(
                    ARCHIVER_GROUP, self.consumer, {stream: position}, count=count
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
        if not found and wait is not None:
            await asyncio.sleep(wait)
        return found

    async def claim(self, min_idle: float) -> tuple[Entries, list[tuple[str, list[str]]]]:
        """Take over entries another consumer of the group read and has not acked for
        ``min_idle`` seconds (its archiver died, or hangs): up to a batch of them, as
        :meth:`read` gives entries; and, per stream, the ids of claimed entries no longer
        in the stream (trimmed or deleted: nothing to archive, only to ack)."""
        found: Entries = []
        gone: list[tuple[str, list[str]]] = []
        budget = self._settings.batch_size
        for stream in self.streams:
            cursor: Any = "0-0"
            while budget > 0:
                try:
                    reply: Any = await self._client.xautoclaim(
                        stream, ARCHIVER_GROUP, self.consumer, int(min_idle * 1000), cursor,
                        count=budget,
                    )  # fmt: skip
                except Exception as exc:
                    if is_nogroup(exc):  # the stream went away: nothing to claim there
                        break
                    raise
                cursor, rows = _text(reply[0]), reply[1] or []
                live = [(_text(i), _flat(f)) for i, f in rows if f]
                dropped = [_text(i) for i, f in rows if not f]  # 6.2 keeps them pending
                dropped += [_text(i) for i in (reply[2] if len(reply) > 2 else None) or []]
                if live:
                    found.append((stream, live))
                    self._note_taken(stream, live[-1][0])  # claimed in entry order
                if dropped:
                    gone.append((stream, dropped))
                budget -= len(rows)
                if cursor == "0-0" or not rows:
                    break
        if found or gone:
            log.warning(
                "took over entries another archiver had read and not acked",
                consumer=self.consumer,
                entries=sum(len(rows) for _, rows in found),
                gone=sum(len(ids) for _, ids in gone),
            )
        return found, gone

    async def prune(self, idle: float) -> list[str]:
        """Delete from the group the other consumers that hold nothing and did not read for
        ``idle`` seconds (archivers of managers that died, their entries claimed since);
        their names, once each. One script per stream looks and deletes at once, so a
        consumer that reads meanwhile is never deleted with entries it holds; a live one
        deleted while idle is made again by its next read."""
        gone: set[str] = set()
        for stream in self.streams:
            try:
                names: Any = await run_script(
                    self._redis, _PRUNE, [stream], [ARCHIVER_GROUP, self.consumer, int(idle * 1000)]
                )
            except Exception as exc:
                if is_nogroup(exc):
                    continue
                raise
            gone |= {_text(name) for name in names or []}
        if gone:
            log.info("archivers that left removed from the group", consumers=sorted(gone))
        return sorted(gone)

    async def leave(self) -> None:
        """Delete this consumer from the group on each stream where it holds nothing (a
        clean stop of one of several archivers); where it still has pending entries it
        stays, for another archiver to claim them."""
        for stream in self.streams:
            try:
                consumers: Any = await self._redis.xinfo_consumers(stream, ARCHIVER_GROUP)
                mine = [c for c in consumers if _text(c.get("name")) == self.consumer]
                if mine and int(mine[0].get("pending", 0)) == 0:
                    await self._redis.xgroup_delconsumer(stream, ARCHIVER_GROUP, self.consumer)
            except Exception as exc:
                log.warning("cannot leave the archiver group", stream=stream, error=str(exc))
                return


#: KEYS: a stream. ARGV: the group, the consumer that keeps its place (ours), the idle
#: time in ms. Deletes each other consumer of the group that holds no entry and was idle
#: that long; returns their names.
_PRUNE = """
local gone = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[2] and pending == 0 and idle >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    gone[#gone + 1] = name
  end
end
return gone
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat(fields: Any) -> list[Any]:
    """An entry's fields as the flat list XREADGROUP gives (RESP3 may give a map)."""
    if isinstance(fields, dict):
        return [item for pair in fields.items() for item in pair]
    return list(fields)


def _as_sent(response: Any, **_: Any) -> Any:
    return response
