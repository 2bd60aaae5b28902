"""The archiver: every event of every stream into PostgreSQL, exactly once, acked after commit.

It is one more consumer group (``archiver``) on every stream of the namespace and on the
dead-letter stream, so Redis itself remembers what is archived: an entry leaves the
group's pending list only after the transaction that stored it committed. Batches are
bounded by size and by time. While PostgreSQL is away it holds its batch and retries with
backoff; nothing more is read, so events wait in Redis (and the stream is not trimmed below
them). A restarted archiver (the same consumer name) re-reads its pending batch first; the
insert is idempotent on the stream's entry id, so no entry is stored twice (the same event
published twice, as two entries, is stored twice).

With ``archive.on_every_host`` every manager runs one, each its own consumer of the group
(``archiver-<host>``), and Redis shares the entries out among them. Each also takes over,
every ``claim_idle / 2`` seconds, what another had read and left unacked for ``claim_idle``
(its manager died mid-batch): the idempotent insert makes a claim of a batch that was
stored after all (a hung archiver, come back) cost a second write, never a second row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus import EventType
from bus.archive.block_codec import ROWS_PER_BLOCK
from bus.archive.errors import ArchiveDataError, ArchiveError, ArchiveUnavailableError
from bus.archive.store import ArchiveStore
from bus.backoff import REDIS_RETRY, Backoff
from bus.connection import raise_swallowed_cancel
from bus.dlq import DeadLetterReason, DeadLetters
from bus.keys import ARCHIVER_CONSUMER, ARCHIVER_GROUP, Keys
from bus.redis_errors import UNAVAILABLE
from manager.archive.batch import (
    Batch,
    Entries,
    Reject,
    decode_batch,
    refusal,
    set_aside_too_old,
)
from manager.archive.filling import Filling
from manager.archive.group_reader import GroupReader
from manager.archive.retention import cutoff_day
from manager.config import ArchiveSettings
from manager.status import ArchiveStatus

log = structlog.get_logger("manager.archive.archiver")
StoreFactory = Callable[[], Awaitable[ArchiveStore]]
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
        max_data_bytes: int | None = None,
        consumer: str = ARCHIVER_CONSUMER,
        leave_on_stop: bool = False,
    ) -> None:
        """``consumer``: its name in the archiver group; ``leave_on_stop``: delete it from
        the group when it stops holding nothing (one of several archivers)."""
        self._announce = announce
        self._max_data_bytes = max_data_bytes
        self._redis = redis
        self._reader = GroupReader(redis, keys, settings, consumer)
        self._leave_on_stop = leave_on_stop
        self._claimed_at = time.monotonic()
        self._keys = keys
        self._dlq = DeadLetters(redis, keys)
        self._settings = settings
        self._store_factory = store
        self._backoff = Backoff(0.2, 30.0)
        self._failing_since = 0.0
        self._announced = False
        #: The entries held back for full blocks (of the current run).
        self._filling: Filling | None = None
        #: Entries whose dead letter Redis refused: not acked, tried again each batch.
        self._unsettled: list[Reject] = []
        #: Whether the last write to PostgreSQL worked (for health checks).
        self.healthy = True
        #: What went wrong last, while unhealthy.
        self.last_error: str | None = None
        #: Events and dead letters stored, batches committed, entries dead-lettered because
        #: they are not events (skipped) or the archive refused them (unarchivable: their
        #: data, or a timestamp older than retention_days, which too_old counts again).
        self.stats: dict[str, int] = {
            "archived": 0, "dead_letters": 0, "batches": 0, "skipped": 0, "unarchivable": 0,
            "too_old": 0,
        }  # fmt: skip

    async def run(self) -> None:
        """Archive until cancelled; an unexpected error (Redis away past its retries, a
        bug) is logged and the archiver starts over after a backoff, re-reading the batch
        it had not acked, so it never ends the manager and never loses an entry."""
        try:
            await self._run_forever()
        finally:
            if self._leave_on_stop:
                await asyncio.shield(self._reader.leave())
            await self._reader.close()

    async def _run_forever(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await self._run()
            except Exception as exc:
                failures = 1 if time.monotonic() - started > 60 else failures + 1
                delay = self._backoff.delay(failures)
                log.error(
                    "archiver stopped on an error; starting over",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 1),
                    exc_info=not isinstance(exc, RedisError | OSError),
                )
                self._reader.forget()
                await asyncio.sleep(delay)

    async def _run(self) -> None:
        """Reading and decoding the next batch overlaps writing the current one; at most
        ``_AHEAD`` batches wait, so while PostgreSQL is away nothing more is read. (Two
        writers at once measured no faster on two cores: the work is CPU-bound.)
        """
        await self._drain_pending()
        batches: asyncio.Queue[Batch] = asyncio.Queue(maxsize=_AHEAD)
        # Anything held from a run before is pending, and the drain above stored it.
        filling = self._filling = Filling(
            ROWS_PER_BLOCK,
            self._settings.held_for_blocks,
            exempt=frozenset({self._keys.dead_letters()}),
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._write_loop(batches))
            while True:
                raise_swallowed_cancel()  # redis-py on 3.11 can drop a cancel mid-command
                await self._reader.discover()
                due = filling.next_due()
                wait = (
                    self._settings.batch_wait
                    if due is None
                    else min(due, self._settings.batch_wait)
                )
                entries = filling.take(await self._reader.read(wait=wait))
                if entries:
                    await batches.put(decode_batch(entries, self._keys, self._max_data_bytes))
                if time.monotonic() - self._claimed_at >= self._settings.claim_idle / 2:
                    self._claimed_at = time.monotonic()
                    claimed, gone = await self._reader.claim(self._settings.claim_idle)
                    await self._ack([(s, [(i, []) for i in ids]) for s, ids in gone], set())
                    if claimed:
                        await batches.put(decode_batch(claimed, self._keys, self._max_data_bytes))
                    await self._reader.prune(2 * self._settings.claim_idle)

    async def _write_loop(self, batches: asyncio.Queue[Batch]) -> None:
        while True:
            raise_swallowed_cancel()  # its acks are redis-py calls, which can drop a cancel
            await self._archive(await batches.get())

    async def _drain_pending(self) -> None:
        """Archive what a previous run had read but not acked (its batch in flight)."""
        await self._reader.discover(force=True)
        after = dict.fromkeys(self._reader.streams, "0")
        while after and (entries := await self._reader.read(after)):
            raise_swallowed_cancel()
            after = {stream: rows[-1][0] for stream, rows in entries}
            await self._archive(decode_batch(entries, self._keys, self._max_data_bytes))

    async def _archive(self, batch: Batch) -> None:
        """Store one batch (retrying while PostgreSQL cannot take it), dead-letter what is
        not an event, older than retention keeps, or what PostgreSQL refused as data, then
        ack all that landed."""
        await self._settle_unsettled()
        if batch.size:
            await self._store_until_done(batch)
        self.stats["batches"] += 1
        refused = await self._settle(batch.rejects)
        await self._ack(
            batch.entries, exclude={(r.source.stream, r.source.entry_id) for r in refused}
        )

    async def _store_until_done(self, batch: Batch) -> None:
        attempt = 0
        while True:
            try:
                store = await self._store_factory()
                await self._store(store, batch)
            except ArchiveError as exc:  # PostgreSQL away, full, read-only, ...: retry
                attempt += 1
                if self.healthy:
                    log.error(
                        "cannot write to PostgreSQL: events stay in Redis and are retried",
                        error=str(exc),
                        batch=batch.size,
                    )
                    self._failing_since = time.monotonic()
                self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
                self._stalled(batch.size)
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

    async def _store(self, store: ArchiveStore, batch: Batch) -> None:
        """Insert a batch; if PostgreSQL refuses its data (SQLSTATE class 22 or 23, never a
        server problem), insert one by one: each event it refuses becomes a reject (dead-
        lettered as unarchivable), so one bad entry cannot hold the archive for ever.
        An event older than retention keeps (judged at each attempt: an outage may last
        past midnight) is set aside first, to be dead-lettered too."""
        retention = self._settings.retention_days
        set_aside_too_old(batch, cutoff_day(datetime.now(UTC).date(), retention), retention)
        if batch.records:
            refused = await self._insert("archived", batch.records, store.insert_records)
            batch.rejects.extend(
                Reject(
                    batch.sources[i], DeadLetterReason.UNARCHIVABLE, refusal(batch.records[i], exc)
                )
                for i, exc in refused
            )
            batch.records, batch.sources = [], []  # stored: a retry must not store them again
        if batch.letters:
            for index, exc in await self._insert(
                "dead_letters", batch.letters, store.insert_dead_letters
            ):
                self.stats["unarchivable"] += 1
                letter = batch.letters[index]
                log.error("a dead letter PostgreSQL will not take: it stays in the dead-letter "
                          "stream only", dlq_id=letter.id, error=str(exc))  # fmt: skip
            batch.letters = []

    async def _insert(
        self, kind: str, items: Sequence[Any], insert: Callable[[list[Any]], Awaitable[int]]
    ) -> list[tuple[int, ArchiveDataError]]:
        """Insert all, else one by one; return the index and error of each item refused as
        data. Anything but a data error (the server's trouble) raises: the batch waits."""
        try:
            inserted = await insert(list(items))  # (not `+= await`: that reads before awaiting)
            self.stats[kind] += inserted
            return []
        except ArchiveDataError as exc:
            log.warning("PostgreSQL refused a batch's data; storing it one by one", error=str(exc))
        except ArchiveError:
            raise
        except Exception as exc:  # not classified: keep the events, try again later
            raise ArchiveUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        refused: list[tuple[int, ArchiveDataError]] = []
        for index, item in enumerate(items):
            try:
                inserted = await insert([item])
            except ArchiveDataError as exc:
                refused.append((index, exc))
                continue
            except ArchiveError:
                raise
            except Exception as exc:
                raise ArchiveUnavailableError(f"{type(exc).__name__}: {exc}") from exc
            self.stats[kind] += inserted
        return refused

    async def _settle(self, rejects: list[Reject]) -> list[Reject]:
        """Dead-letter each reject (in the archiver's name); return those Redis refused,
        which stay pending (not acked) and are tried again with the next batch."""
        refused: list[Reject] = []
        for reject in rejects:
            if await self._dead_letter(reject):
                key = "skipped" if reject.reason is DeadLetterReason.MALFORMED else "unarchivable"
                self.stats[key] += 1
                if reject.too_old:
                    self.stats["too_old"] += 1
            else:
                refused.append(reject)
        self._unsettled.extend(refused)
        return refused

    async def _settle_unsettled(self) -> None:
        if not self._unsettled:
            return
        retrying, self._unsettled = self._unsettled, []
        refused = await self._settle(retrying)
        done = [r for r in retrying if r not in refused]
        await self._ack([(r.source.stream, [(r.source.entry_id, [])]) for r in done], set())

    async def _dead_letter(self, reject: Reject) -> bool:
        """Write one dead letter; True once stored. Waits while Redis is unreachable;
        False when Redis answers with an error (out of memory, read-only, no permission)."""
        source, waits = reject.source, REDIS_RETRY.waits()
        while True:
            try:
                dlq_id = await self._dlq.add(
                    fields=source.as_dict(),
                    reason=reject.reason,
                    error=reject.error,
                    stream=source.stream,
                    entry_id=source.entry_id,
                    group=ARCHIVER_GROUP,
                    consumer=self._reader.consumer,
                )
            except UNAVAILABLE as exc:
                log.warning("dead-letter write failed; retrying", error=str(exc))
                await asyncio.sleep(next(waits))
                continue
            except RedisError as exc:
                log.error("Redis refuses a dead letter: the entry stays pending, tried again "
                          "with the next batch", entry_id=source.entry_id, stream=source.stream,
                          error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                return False
            log.error(
                "entry not archived: dead-lettered",
                reason=str(reject.reason),
                dlq_id=dlq_id,
                stream=source.stream,
                entry_id=source.entry_id,
                error=reject.error,
            )
            return True

    async def _ack(self, entries: Entries, exclude: set[tuple[str, str]]) -> None:
        """XACK what landed, waiting while Redis is unreachable (the rows are committed:
        an entry not acked is only read again and found stored)."""
        for stream, rows in entries:
            ids = [entry_id for entry_id, _ in rows if (stream, entry_id) not in exclude]
            waits = REDIS_RETRY.waits()
            while ids:
                try:
                    await self._redis.xack(stream, ARCHIVER_GROUP, *ids)
                except UNAVAILABLE as exc:
                    log.warning("ack failed; retrying", stream=stream, error=str(exc))
                    await asyncio.sleep(next(waits))
                    continue
                except RedisError as exc:  # the stream or group is gone: nothing to ack
                    log.warning("ack refused", stream=stream, error=str(exc))
                break

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

    def status(self) -> ArchiveStatus:
        """Health and counters, for status and /healthz."""
        return ArchiveStatus(
            healthy=self.healthy,
            last_error=self.last_error,
            held=self._filling.held if self._filling is not None else 0,
            **self.stats,
        )

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"failing ({self.last_error})"
        streams = len(self._reader.streams)
        return f"<Archiver streams={streams} {state} archived={self.stats['archived']}>"
