"""The event archive in PostgreSQL: idempotent batch writes, day partitions, queries, replay.

Streams are stored by NAME (``user``), not by Redis key: the store turns the keys of the
events it is given into names with :meth:`bus.keys.Keys.stream_name` and gives the keys back
(:meth:`bus.keys.Keys.stream`) on the events it returns, so they read as they did from Redis.
Methods taking a stream accept either form.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from types import TracebackType
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from bus.archive import partitions
from bus.archive.audit_log import AuditLog
from bus.archive.block_writes import write_blocks
from bus.archive.deliveries import Deliveries
from bus.archive.dictionaries import Dictionaries
from bus.archive.errors import ArchiveDataError, describe_dsn, unavailable_on_failure
from bus.archive.event_reads import EventReads
from bus.archive.group_positions import GroupPositions
from bus.archive.inserts import advance_state, write_dead_letters
from bus.archive.migrations import migrate
from bus.archive.names import Kinds
from bus.archive.rows import (
    EVENT_COLUMNS,
    as_utc,
    decode_cursor,
    encode_cursor,
    event_record,
    record_event,
)
from bus.archive.subscriptions import load_subscriptions, replace_subscriptions
from bus.conditions import Where
from bus.dlq import DeadLetter
from bus.event import Event
from bus.keys import Keys

log = structlog.get_logger("bus.archive")

_CLOSE_GRACE = 10.0  # seconds close() waits for borrowed connections before terminating
_CHECK_VIOLATION = "23514"  # a row fits no partition
_CREATED_AT = EVENT_COLUMNS.index("created_at")

# $1: stream name. Returns the last entry id archived from it, or no row. ('0-0': a row
# a writer made to lock, for a stream of which nothing new was stored.)
_LAST_ARCHIVED = (
    "SELECT last_entry_id FROM archive_state WHERE stream = $1 AND last_entry_id <> '0-0'"
)
# Every subscriber with stored subscriptions. Returns (subscriber) rows.
_SUBSCRIBERS = "SELECT DISTINCT subscriber FROM event_subscriptions ORDER BY subscriber"
# Every stream's last archived entry. Returns (stream name, last_entry_id) rows.
_POSITIONS = "SELECT stream, last_entry_id FROM archive_state WHERE last_entry_id <> '0-0'"
# No parameters. Returns the bytes of every table of events (partitions with their
# indexes and TOAST, both layouts, and the numbered names).
_SIZE = """
SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint
    + pg_total_relation_size('event_kinds') + pg_total_relation_size('event_dictionaries')
FROM pg_inherits i
WHERE i.inhparent IN ('events'::regclass, 'event_heads'::regclass,
                      'event_blocks'::regclass, 'event_odd_ids'::regclass)
"""


async def _reset(conn: Any) -> None:
    """What a connection needs on its way back to the pool. The store leaves no session
    state behind (no LISTEN, session locks or SET; transactions are context managers), so
    asyncpg's own reset (four statements, a round trip on every read) is not needed; a
    transaction still open (a cancelled read) is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")  # no parameters; returns nothing


class ArchiveStore:
    """Reads and writes the archive over an asyncpg pool.

    Build it with :meth:`connect`; call :meth:`migrate` once at start. Every method raises
    :class:`~bus.archive.errors.ArchiveUnavailableError` when PostgreSQL cannot be reached.
    """

    #: Rows a filtered :meth:`query` reads per call before returning a short page.
    max_scan = 20_000

    def __init__(self, pool: Any, *, keys: Keys | None = None, where: str = "PostgreSQL") -> None:
        self._pool = pool
        self._keys = keys or Keys()
        self._where = where
        self._days: set[date] = set()  # days known to have a partition
        self._kinds = Kinds()
        self._dicts = Dictionaries()
        self._reads = EventReads(self._kinds, self._dicts)
        self._delivery_days: set[date] = set()  # the same, of deliveries

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        keys: Keys | None = None,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout: float = 10.0,
    ) -> ArchiveStore:
        """Open a pool to ``dsn``; ``keys`` maps stream keys to names (default namespace)."""
        where = describe_dsn(dsn)
        with unavailable_on_failure(where, dsn):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                reset=_reset,
                # Plans are made once per statement: re-planning over every day's partition
                # costs more than most reads (statements are written for generic plans).
                server_settings={
                    "application_name": "multibot-archive",
                    "plan_cache_mode": "force_generic_plan",
                },
            )
        return cls(pool, keys=keys, where=where)

    async def close(self) -> None:
        """Close the pool, waiting a bounded time for connections in use."""
        try:
            await asyncio.wait_for(self._pool.close(), _CLOSE_GRACE)
        except TimeoutError:
            log.warning("archive pool did not close in time; terminating", where=self._where)
            self._pool.terminate()

    async def __aenter__(self) -> ArchiveStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def connection(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A pooled connection (for the manager's own statements, e.g. roles)."""
        return self._connection()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        with unavailable_on_failure(self._where):
            async with self._pool.acquire() as conn:
                yield conn

    def _name(self, stream: str) -> str:
        return self._keys.stream_name(stream)

    async def migrate(self) -> tuple[int, int]:
        """Apply missing schema migrations; return (version before, version after)."""
        async with self._connection() as conn:
            return await migrate(conn)

    # -- partitions -----------------------------------------------------------------------

    async def ensure_partitions(self, days: Iterable[date]) -> list[str]:
        """Create the partitions these days lack; return the names created.

        Days already seen by this store cost nothing (no query)."""
        missing = set(days) - self._days
        if not missing:
            return []
        async with self._connection() as conn:
            created = await partitions.create_partitions(conn, missing)
        self._days |= missing
        return created

    async def create_partitions_ahead(self, today: date, days: int) -> list[str]:
        """Ensure partitions for ``today`` and the ``days`` days after it; return those created."""
        return await self.ensure_partitions(today + timedelta(days=n) for n in range(days + 1))

    async def drop_partitions_before(self, day: date) -> list[str]:
        """DROP the partitions of every day before ``day`` (events in both layouts, and
        the deliveries of those events); return their names, table by table, oldest first."""
        dropped: list[str] = []
        async with self._connection() as conn:
            for table in partitions.TABLES:
                dropped += await partitions.drop_partitions_before(conn, day, table)
        self._days = {d for d in self._days if d >= day}
        self._delivery_days -= {d for d in self._delivery_days if d < day}
        return dropped

    async def partitions(self) -> list[date]:
        """The days that have a partition (in either layout), oldest first."""
        async with self._connection() as conn:
            days = await partitions.existing_days(conn)
            return sorted(days | await partitions.existing_days(conn, "events"))

    # -- writing --------------------------------------------------------------------------

    async def insert_events(self, events: Sequence[Event]) -> int:
        """Archive events read from Redis in one transaction; return how many were new.

        Each event needs ``stream`` (its key) and ``entry_id``. Events already archived are
        skipped, so a batch may be retried freely. ``archive_state`` moves to the highest
        entry id of each stream in the same transaction.
        """
        records: list[tuple[Any, ...]] = []
        for event in events:
            if event.stream is None:
                raise ValueError(f"{event!r} has no stream: archive events read from Redis")
            records.append(event_record(event, self._name(event.stream)))
        return await self.insert_records(records)

    async def insert_records(self, records: Sequence[tuple[Any, ...]]) -> int:
        """:meth:`insert_events` for rows already built (:func:`~bus.archive.rows.event_record`
        or :func:`~bus.archive.rows.entry_record`, streams by name)."""
        if not records:
            return 0
        state = advance_state(records)
        days = {partitions.day_of(record[_CREATED_AT]) for record in records}
        for attempt in (1, 2):
            await self.ensure_partitions(days)
            try:
                async with self._connection() as conn:
                    return await write_blocks(
                        conn,
                        records,
                        advance_state=state,
                        kinds=self._kinds,
                        dicts=self._dicts,
                    )
            except ArchiveDataError as exc:
                if exc.sqlstate != _CHECK_VIOLATION or attempt == 2:
                    raise
                # No partition for a row: dropped elsewhere (retention) since we made it.
                log.warning("archive partition vanished; re-creating", days=sorted(map(str, days)))
                self._days -= days
        raise AssertionError("unreachable")

    async def insert_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Archive dead letters; return how many were new (one already stored is skipped)."""
        if not letters:
            return 0
        async with self._connection() as conn:
            return await write_dead_letters(conn, letters)

    async def last_archived(self, stream: str) -> str | None:
        """The highest entry id archived from ``stream`` (name or key), None if none."""
        async with self._connection() as conn:
            value = await conn.fetchval(_LAST_ARCHIVED, self._name(stream))
        return None if value is None else str(value)

    async def positions(self) -> dict[str, str]:
        """The last entry archived of every stream, by stream key."""
        async with self._connection() as conn:
            rows = await conn.fetch(_POSITIONS)
        return {self._keys.stream(row["stream"]): str(row["last_entry_id"]) for row in rows}

    @property
    def audit(self) -> AuditLog:
        """Operator actions (see bus.archive.audit_log)."""
        return AuditLog(self.connection)

    @property
    def deliveries(self) -> Deliveries:
        """What each group did with each event (see bus.archive.deliveries)."""
        return Deliveries(self.connection, self._delivery_days)

    @property
    def group_positions(self) -> GroupPositions:
        """Each consumer group's acked position per stream (see bus.archive.group_positions)."""
        return GroupPositions(self.connection, self._keys)

    async def upsert_subscriptions(
        self, subscriber: str, subscriptions: Iterable[tuple[str, Mapping[str, Any] | None]]
    ) -> int:
        """Replace ``subscriber``'s stored (pattern, conditions) rows; return how many now.

        Patterns and conditions are checked first (``SubscriptionError``); a repeated
        pattern keeps its last conditions.
        """
        async with self._connection() as conn:
            return await replace_subscriptions(conn, subscriber, subscriptions)

    async def subscriptions(self, subscriber: str) -> list[tuple[str, dict[str, Any]]]:
        """``subscriber``'s stored (pattern, conditions), by pattern."""
        async with self._connection() as conn:
            return await load_subscriptions(conn, subscriber)

    async def subscribers(self) -> list[str]:
        """Every subscriber with stored subscriptions."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SUBSCRIBERS)
        return [str(row["subscriber"]) for row in rows]

    # -- reading --------------------------------------------------------------------------

    async def query(
        self,
        *,
        types: Sequence[str] = (),
        source: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        where: Mapping[str, Any] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> tuple[list[Event], str | None]:
        """One page of events in (created_at, id) order, and the cursor of the next page.

        ``types`` are patterns (any may match); ``since`` is inclusive, ``until`` exclusive
        (publisher time; naive means UTC); ``where`` holds :class:`bus.conditions.Where`
        conditions on data; ``after`` is the cursor the previous page returned. The cursor
        is None when nothing more matches. With ``where``, a page may hold fewer than
        ``limit`` events (at most :attr:`max_scan` rows are read per call): keep paging
        while the cursor is not None.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        matches = Where(where).matches if where else None
        patterns = [types] if isinstance(types, str) else list(types)  # a str is one pattern
        position = decode_cursor(after) if after is not None else None
        # limit + 1 to know a next page exists, + 1 for the cursor's own event, + 1 for the
        # last instant a chunk holds back (bus.archive.block_reads.scan): one round trip.
        chunk = limit + 3 if matches is None else max(limit + 3, 500)
        found: list[Event] = []
        scanned = 0
        since, until = (None if t is None else as_utc(t) for t in (since, until))
        async with self._connection() as conn:
            records = self._reads.query(
                conn, types=patterns, source=source, since=since, until=until,
                after=position, chunk=chunk,
            )  # fmt: skip
            async with contextlib.aclosing(records):
                async for batch in records:
                    for record in batch:
                        event = record_event(record, self._keys)
                        if matches is None or matches(event.data):
                            if len(found) == limit:  # one more exists: the next page starts here
                                return found, encode_cursor(found[-1].timestamp, found[-1].id)
                            found.append(event)
                        scanned += 1
                        if scanned >= self.max_scan:
                            return found, encode_cursor(event.timestamp, event.id)
        return found, None

    async def get(self, event_id: str) -> Event | None:
        """The archived event with this id, or None."""
        async with self._connection() as conn:
            record = await self._reads.get(conn, event_id)
        return None if record is None else record_event(record, self._keys)

    async def trace(self, correlation_id: str, *, limit: int = 10_000) -> list[Event]:
        """A whole correlation chain: the root event (id = correlation_id) and every event
        carrying that correlation id, by publisher time."""
        async with self._connection() as conn:
            records = await self._reads.trace(conn, correlation_id, limit)
        return [record_event(record, self._keys) for record in records]

    async def entries(
        self,
        stream: str,
        *,
        after: str | None = None,
        before: str | None = None,
        types: Sequence[str] = (),
        limit: int = 1000,
    ) -> list[Event]:
        """Archived events of a stream (name or key) in entry id order, for replay.

        ``after`` and ``before`` are exclusive entry-id bounds (``ms`` alone excludes that
        whole millisecond); events come back with ``stream`` (the key) and ``entry_id`` as
        they were read from Redis.
        """
        patterns = [types] if isinstance(types, str) else list(types)
        async with self._connection() as conn:
            records = await self._reads.entries(
                conn, self._name(stream), after=after, before=before, types=patterns, limit=limit
            )
        return [record_event(record, self._keys) for record in records]

    async def count(self) -> int:
        """How many events are archived (sums every block: slow on a large archive)."""
        async with self._connection() as conn:
            return await self._reads.count(conn)

    async def size_bytes(self) -> int:
        """Bytes the events take on disk (both layouts), indexes and TOAST included."""
        async with self._connection() as conn:
            return int(await conn.fetchval(_SIZE))

    def __repr__(self) -> str:
        return (
            f"<ArchiveStore {self._where} pool={self._pool.get_size()}/{self._pool.get_max_size()}"
            f" partitions_known={len(self._days)}>"
        )
