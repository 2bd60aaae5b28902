"""The two archives ``bench-archive --query-events`` compares, each in a database of its
own on one server: the old layout (one row per event in ``events``, schema up to 5) loaded
as the archiver loaded it, and the compact one written by :class:`ArchiveStore`; and the
old layout's reads as ``ArchiveStore`` made them before schema 6 (:class:`OldLayout`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]  # ships no type hints

from bus.archive import legacy_reads
from bus.archive.inserts import stream_heads, write_events
from bus.archive.migrations import migrate
from bus.archive.partitions import create_partitions
from bus.archive.queries import EventSelect
from bus.archive.rows import EVENT_COLUMNS, decode_cursor, encode_cursor, record_event
from bus.archive.store import ArchiveStore
from bus.conditions import Where
from bus.event import Event
from bus.keys import Keys
from manager.bench.archive_dataset import DAY, Sample, SyntheticDay, chunks
from manager.bench.database import with_database
from manager.embedded.postgres_server import PostgresServer

#: Events per COPY into the old layout, and per ``insert_records`` (the archiver's batch).
OLD_BATCH, NEW_BATCH = 20_000, 2_000
_START_TIMEOUT = 120.0  # initdb on a busy 2-core box with a slow disk
_CREATED_AT, _ID = EVENT_COLUMNS.index("created_at"), EVENT_COLUMNS.index("id")
# No parameters. Returns the bytes of every partition of events (the old layout) with their
# indexes and TOAST.
_OLD_SIZE = """
SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint
FROM pg_inherits WHERE inhparent = 'events'::regclass
"""


class Reads(Protocol):
    """The reads the CLI and the API make, as :class:`ArchiveStore` offers them."""

    async def get(self, event_id: str) -> Event | None: ...

    async def trace(self, correlation_id: str, *, limit: int = ...) -> list[Event]: ...

    async def query(
        self,
        *,
        types: Sequence[str] = ...,
        source: str | None = ...,
        since: datetime | None = ...,
        until: datetime | None = ...,
        where: Mapping[str, Any] | None = ...,
        after: str | None = ...,
        limit: int = ...,
    ) -> tuple[list[Event], str | None]: ...

    async def entries(
        self, stream: str, *, after: str | None = ..., limit: int = ...
    ) -> list[Event]: ...


class OldLayout:
    """The reads of :class:`ArchiveStore` before schema 6, on ``events`` (through
    :mod:`bus.archive.legacy_reads`): what the compact layout is measured against.

    A pooled connection per call and an :class:`Event` per row, as the store did.
    """

    #: Rows a filtered :meth:`query` reads per call before returning a short page (as then).
    max_scan = 20_000

    def __init__(self, pool: Any, keys: Keys | None = None) -> None:
        self._pool = pool
        self._keys = keys or Keys()

    async def get(self, event_id: str) -> Event | None:
        """The event with this id, or None."""
        async with self._pool.acquire() as conn:
            record = await legacy_reads.get(conn, event_id)
        return None if record is None else record_event(record, self._keys)

    async def trace(self, correlation_id: str, *, limit: int = 10_000) -> list[Event]:
        """The root event and every event correlated with it, by publisher time."""
        async with self._pool.acquire() as conn:
            records = await legacy_reads.trace(conn, correlation_id, limit)
        return [record_event(record, self._keys) for record in records]

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
        """One page in (created_at, id) order and the next page's cursor: the loop of
        ``ArchiveStore.query`` before schema 6, ``where`` tested in Python on chunks of 500."""
        matches = Where(where).matches if where else None
        select = EventSelect().types(types).equals("source", source).time_range(since, until)
        position = decode_cursor(after) if after is not None else None
        chunk = limit + 1 if matches is None else max(limit + 1, 500)
        found: list[Event] = []
        scanned = 0
        async with self._pool.acquire() as conn:
            while True:
                records = await legacy_reads.page(conn, select, position, chunk)
                for record in records:
                    event = record_event(record, self._keys)
                    if matches is None or matches(event.data):
                        if len(found) == limit:  # one more exists: the next page starts here
                            return found, encode_cursor(found[-1].timestamp, found[-1].id)
                        found.append(event)
                    position = (record[_CREATED_AT], record[_ID])
                scanned += len(records)
                if len(records) < chunk:
                    return found, None
                if scanned >= self.max_scan and position is not None:
                    return found, encode_cursor(*position)

    async def entries(
        self, stream: str, *, after: str | None = None, limit: int = 1000
    ) -> list[Event]:
        """Events of a stream (by name) after an entry id, in entry order, for replay."""
        async with self._pool.acquire() as conn:
            records = await legacy_reads.entries(
                conn, stream, after=after, before=None, types=(), limit=limit
            )
        return [record_event(record, self._keys) for record in records]

    def __repr__(self) -> str:
        return f"<OldLayout pool={self._pool.get_size()}/{self._pool.get_max_size()}>"


@contextlib.asynccontextmanager
async def private_server() -> AsyncIterator[str]:
    """A private PostgreSQL in a temporary directory, for the run; yield its DSN."""
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-queries-"))
    try:
        os.chmod(work, 0o711)  # as root the private PostgreSQL runs as another user
        server = PostgresServer(work / "postgres")
        try:
            await server.start(timeout=_START_TIMEOUT)
            yield server.dsn
        finally:
            await server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def database(server_dsn: str, label: str) -> AsyncIterator[str]:
    """A migrated database created on ``server_dsn``'s server for the run; yield its DSN,
    drop it at the end."""
    name = f"multibot_bench_{label}_{secrets.token_hex(4)}"
    # Identifier of our own making: DDL takes no bind parameters. Returns nothing.
    await _execute(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(server_dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        # FORCE (PostgreSQL 13+): ends the sessions still open. Returns nothing.
        await _execute(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def load_old_layout(
    dsn: str, day: SyntheticDay, sample: Sample, echo: Callable[[str], None]
) -> float:
    """COPY the day into ``events`` (its partition created first) as the archiver did
    before schema 6, noting the records in ``sample``; return the seconds it took."""
    progress = _Progress("old layout", day.events, echo)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.monotonic()
        await create_partitions(conn, [DAY], ("events",))
        for batch in chunks(day.records(), OLD_BATCH):
            sample.add(batch)
            await write_events(conn, batch, stream_heads(batch))
            progress.add(len(batch))
        return time.monotonic() - started
    finally:
        await conn.close()


async def load_new_layout(
    store: ArchiveStore, day: SyntheticDay, echo: Callable[[str], None]
) -> float:
    """Write the day through ``store.insert_records`` in the archiver's batches; return the
    seconds it took."""
    progress = _Progress("compact layout", day.events, echo)
    started = time.monotonic()
    for batch in chunks(day.records(), NEW_BATCH):
        await store.insert_records(batch)
        progress.add(len(batch))
    return time.monotonic() - started


async def vacuum(dsn: str) -> None:
    """VACUUM ANALYZE the database: visibility maps set and statistics fresh, as a day
    long written is by the time it is queried."""
    await _execute(dsn, "VACUUM ANALYZE")  # outside a transaction; returns nothing


async def old_layout_bytes(dsn: str) -> int:
    """Bytes the old layout's partitions take, indexes and TOAST included."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(_OLD_SIZE))
    finally:
        await conn.close()


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class _Progress:
    """Says how far a load is, at every tenth of it."""

    def __init__(self, what: str, total: int, echo: Callable[[str], None]) -> None:
        self._what, self._total, self._echo = what, total, echo
        self._done = 0
        self._next = 1  # the next tenth to report

    def add(self, count: int) -> None:
        self._done += count
        if self._done * 10 >= self._next * self._total:
            self._echo(f"  {self._what}: {self._done:,} of {self._total:,} events loaded")
            self._next = self._done * 10 // self._total + 1
