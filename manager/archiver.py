"""The archiver: every event of every stream into PostgreSQL, exactly once, acked after commit.

It is one more consumer group (``archiver``) on every stream of the namespace and on the
dead-letter stream, so Redis itself remembers what is archived: an entry leaves the
group's pending list only after the transaction that stored it committed. Batches are
bounded by size and by time. While PostgreSQL is away it holds its batch and retries with
backoff; nothing more is read, so events wait in Redis (and the stream is not trimmed below
them). A restarted archiver (the same consumer name) re-reads its pending batch first; the
insert is idempotent on the event id, so nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio import Redis

from bus import EventType
from bus.archive.errors import ArchiveError
from bus.archive.rows import entry_record, event_record, nul_free
from bus.archive.store import ArchiveStore
from bus.backoff import Backoff
from bus.connection import raise_swallowed_cancel
from bus.dlq import DeadLetter, parse_dead_letter
from bus.errors import WireFormatError
from bus.keys import ARCHIVER_CONSUMER, ARCHIVER_GROUP, Keys
from bus.redis_errors import UNAVAILABLE, is_busygroup, is_nogroup
from bus.wire import decode
from manager.config import ArchiveSettings
from manager.lag import stream_keys

log = structlog.get_logger("manager.archiver")
StoreFactory = Callable[[], Awaitable[ArchiveStore]]
#: What one read returns: per stream, its entries as (entry id, flat [name, value, ...]
#: fields); the fields are empty for an entry deleted while pending.
Entries = list[tuple[str, list[tuple[str, list[str]]]]]
Record = tuple[Any, ...]
Batch = tuple[Entries, list[Record], list[DeadLetter]]
_DISCOVER_EVERY = 5.0  # seconds between looks for new streams
_AHEAD = 2  # batches read ahead of the one being written
#: Seconds of failing writes before system.archive.stalled is published.
STALL_AFTER = 10.0


class Archiver:
    """Copies the namespace's streams into the archive store; :meth:`run` until cancelled."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: ArchiveSettings,
        store: StoreFactory,
        *,
        announce: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._announce = announce
        self._redis = redis
        # XREADGROUP replies as they come (no dict per entry): the fields go straight into
        # rows. A client of its own, on the same pool, so no one else's replies change.
        self._reader = Redis(connection_pool=redis.connection_pool)
        self._reader.set_response_callback("XREADGROUP", _as_sent)
        self._keys = keys
        self._settings = settings
        self._store_factory = store
        self._streams: list[str] = []
        self._discovered = 0.0
        self._backoff = Backoff(0.2, 30.0)
        self._failing_since = 0.0
        self._announced = False
        #: Whether the last write to PostgreSQL worked (for health checks).
        self.healthy = True
        #: What went wrong last, while unhealthy.
        self.last_error: str | None = None
        #: Events and dead letters stored, batches committed, malformed entries skipped.
        self.stats: dict[str, int] = {
            "archived": 0, "dead_letters": 0, "batches": 0, "skipped": 0, "unarchivable": 0
        }  # fmt: skip

    async def run(self) -> None:
        """Archive until cancelled.

        Reading and decoding the next batch overlaps writing the current one; at most
        ``_AHEAD`` batches wait, so while PostgreSQL is away nothing more is read. (Two
        writers at once measured no faster on two cores: the work is CPU-bound.)
        """
        await self._drain_pending()
        batches: asyncio.Queue[Batch] = asyncio.Queue(maxsize=_AHEAD)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._write_loop(batches))
            while True:
                raise_swallowed_cancel()  # redis-py on 3.11 can drop a cancel mid-command
                await self._discover()
                entries = await self._read(">")
                if entries:
                    await batches.put((entries, *self._decode(entries)))

    async def _write_loop(self, batches: asyncio.Queue[Batch]) -> None:
        while True:
            raise_swallowed_cancel()  # its acks are redis-py calls, which can drop a cancel
            entries, records, letters = await batches.get()
            await self._archive(entries, records, letters)

    async def _discover(self, force: bool = False) -> None:
        """Find the namespace's streams (new routes appear) and join each with our group."""
        now = time.monotonic()
        if not force and now - self._discovered < _DISCOVER_EVERY and self._streams:
            return
        self._discovered = now
        streams = [*await stream_keys(self._redis, self._keys), self._keys.dead_letters()]
        for stream in streams:
            if stream not in self._streams:
                await self._join(stream)
        self._streams = streams

    async def _join(self, stream: str) -> None:
        try:  # from the start: what is in Redis when the archiver first comes is archived
            await self._redis.xgroup_create(stream, ARCHIVER_GROUP, id="0", mkstream=True)
        except Exception as exc:
            if not is_busygroup(exc):
                raise
        else:
            log.info("archiving a new stream", stream=stream)

    async def _read(self, start: str) -> Entries:
        """One batch: up to batch_size entries, waiting at most batch_wait for the first."""
        if not self._streams:
            await self._discover(force=True)
        try:
            response: Any = await self._reader.xreadgroup(
                ARCHIVER_GROUP,
                ARCHIVER_CONSUMER,
                dict.fromkeys(self._streams, start),
                count=self._settings.batch_size,
                block=None if start == "0" else int(self._settings.batch_wait * 1000),
            )
        except Exception as exc:
            if is_nogroup(exc):  # Redis lost a stream or our group: join again
                self._streams = []
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

    async def _drain_pending(self) -> None:
        """Archive what a previous run had read but not acked (its batch in flight)."""
        await self._discover(force=True)
        while entries := await self._read("0"):
            raise_swallowed_cancel()
            if not any(fields for _, rows in entries for _, fields in rows):
                # Entries deleted from the stream while pending: nothing left to store.
                for stream, rows in entries:
                    await self._redis.xack(stream, ARCHIVER_GROUP, *[i for i, _ in rows])
                continue
            await self._archive(entries, *self._decode(entries))

    async def _archive(
        self, entries: Entries, events: list[Record], letters: list[DeadLetter]
    ) -> None:
        """Store one batch (retrying while PostgreSQL is away), then ack it."""
        attempt = 0
        while True:
            try:
                store = await self._store_factory()
                await self._store(store, events, letters)
            except ArchiveError as exc:  # PostgreSQL away (or a schema to fix): retry
                attempt += 1
                if self.healthy:
                    log.error(
                        "cannot write to PostgreSQL: events stay in Redis and are retried",
                        error=str(exc),
                        batch=len(events) + len(letters),
                    )
                    self._failing_since = time.monotonic()
                self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
                self._stalled(len(events) + len(letters))
                await asyncio.sleep(self._backoff.delay(attempt))
                continue
            break
        if not self.healthy:
            log.info("PostgreSQL reachable again: archiving resumed", after_attempts=attempt)
            if self._announced and self._announce is not None:
                seconds = round(time.monotonic() - self._failing_since, 1)
                self._announce(EventType.ARCHIVE_RESUMED, {"seconds": seconds})
            self._announced = False
        self.healthy, self.last_error = True, None
        self.stats["batches"] += 1
        for stream, rows in entries:
            await self._redis.xack(stream, ARCHIVER_GROUP, *[entry_id for entry_id, _ in rows])

    async def _store(
        self, store: ArchiveStore, events: list[Record], letters: list[DeadLetter]
    ) -> None:
        """Insert a batch; if PostgreSQL refuses its data (not its connection), insert one
        by one and skip, loudly, what it will never take, so one bad entry cannot hold the
        archive (and the trimming of its stream) for ever."""
        if events:
            await self._insert("archived", events, store.insert_records, _record_ids)
        if letters:
            await self._insert("dead_letters", letters, store.insert_dead_letters, _letter_ids)

    async def _insert(
        self,
        kind: str,
        items: list[Any],
        insert: Callable[[list[Any]], Awaitable[int]],
        ids: Callable[[Any], dict[str, Any]],
    ) -> None:
        try:
            inserted = await insert(items)  # (not `+= await`: that reads before awaiting)
            self.stats[kind] += inserted
            return
        except ArchiveError:
            raise
        except Exception as exc:
            log.warning("PostgreSQL refused a batch; storing it one by one", error=str(exc))
        for item in items:
            try:
                inserted = await insert([item])
                self.stats[kind] += inserted
            except ArchiveError:
                raise
            except Exception as exc:
                self.stats["unarchivable"] += 1
                log.error(
                    "an entry PostgreSQL will not take: not archived",
                    **ids(item),
                    error=f"{type(exc).__name__}: {exc}",
                )

    def _stalled(self, waiting: int) -> None:
        """Once per outage, after STALL_AFTER seconds of failing: system.archive.stalled."""
        seconds = time.monotonic() - self._failing_since
        if self._announced or seconds < STALL_AFTER or self._announce is None:
            return
        self._announced = True
        self._announce(
            EventType.ARCHIVE_STALLED,
            {"error": self.last_error, "seconds": round(seconds, 1), "waiting": waiting},
        )

    def _decode(self, entries: Entries) -> tuple[list[Record], list[DeadLetter]]:
        """Rows for the events (our publisher's entries straight from their fields, others
        through the wire decoder) and the dead letters; malformed entries are skipped."""
        records: list[Record] = []
        letters: list[DeadLetter] = []
        dlq = self._keys.dead_letters()
        for stream, rows in entries:
            if stream == dlq:
                letters.extend(self._letters(rows))
                continue
            name = nul_free(self._keys.stream_name(stream))
            for entry_id, fields in rows:
                if not fields:
                    continue  # deleted while pending
                record = entry_record(name, entry_id, fields)
                if record is None:
                    try:
                        record = event_record(decode(_as_dict(fields), stream, entry_id), name)
                    except (WireFormatError, ValueError) as exc:
                        # Not an event: consumers dead-letter it, and the dead letter is archived.
                        self.stats["skipped"] += 1
                        log.warning("not archiving a malformed entry", stream=stream,
                                    entry_id=entry_id, error=str(exc))  # fmt: skip
                        continue
                records.append(record)
        return records, letters

    def _letters(self, rows: list[tuple[str, list[str]]]) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for entry_id, fields in rows:
            if not fields:
                continue
            try:
                letters.append(parse_dead_letter(entry_id, _as_dict(fields)))
            except Exception as exc:  # a foreign writer's garbage in the DLQ
                self.stats["skipped"] += 1
                log.warning("not archiving a malformed dead letter", entry_id=entry_id,
                            error=str(exc))  # fmt: skip
        return letters

    def status(self) -> dict[str, Any]:
        """Health and counters, for status and /healthz."""
        return {"healthy": self.healthy, "last_error": self.last_error, **self.stats}

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"failing ({self.last_error})"
        return f"<Archiver streams={len(self._streams)} {state} archived={self.stats['archived']}>"


def _as_sent(response: Any, **_: Any) -> Any:
    return response


def _as_dict(fields: list[str]) -> dict[str, str]:
    return dict(zip(fields[0::2], fields[1::2], strict=True))


def _record_ids(record: Record) -> dict[str, Any]:
    return {"event_id": record[0], "entry_id": f"{record[-2]}-{record[-1]}"}


def _letter_ids(letter: DeadLetter) -> dict[str, Any]:
    return {"event_id": letter.event_id, "entry_id": letter.entry_id}
