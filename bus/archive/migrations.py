"""Versioned schema migrations of the archive database, applied in order, each once.

A migration is never edited once released: change the schema by appending a new one. The
database records what it has in ``schema_version``; a database newer than this code is
refused rather than touched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from bus.archive.errors import SchemaTooNewError

log = structlog.get_logger("bus.archive")


class Migration(NamedTuple):
    """One schema change."""

    version: int
    description: str
    sql: str


_V1 = """
-- Every event, one partition per UTC day of created_at (the publisher's time), named
-- events_YYYYMMDD and created by the store; no default partition, so an event for a day
-- without one fails loudly instead of landing somewhere retention never drops.
-- stream is the stream NAME (user), not its Redis key; entry_ms/entry_seq are its entry id.
-- type is COLLATE "C" so a left-anchored prefix range on it can use the index.
CREATE TABLE events (
    id             text        NOT NULL,
    type           text        COLLATE "C" NOT NULL,
    source         text        NOT NULL,
    data           jsonb       NOT NULL,
    correlation_id text,
    causation_id   text,
    version        integer     NOT NULL,
    key            text,
    created_at     timestamptz NOT NULL,
    stored_at      timestamptz NOT NULL DEFAULT now(),
    stream         text        NOT NULL,
    entry_ms       bigint      NOT NULL,
    entry_seq      bigint      NOT NULL,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX events_type_created_at ON events (type, created_at);
CREATE INDEX events_source_created_at ON events (source, created_at);
CREATE INDEX events_correlation_id ON events (correlation_id);
CREATE INDEX events_stream_entry ON events (stream, entry_ms, entry_seq);
-- Keyset paging of queries in (created_at, id) order.
CREATE INDEX events_created_at_id ON events (created_at, id);

-- A copy of each dead-letter entry; id is its entry id in the DLQ stream. stream and
-- entry_id are the DLQ entry's fields as written (the origin stream's KEY); entry holds the
-- original entry's fields.
CREATE TABLE dead_letters (
    id         text        PRIMARY KEY,
    event_id   text        NOT NULL,
    type       text        NOT NULL,
    reason     text        NOT NULL,
    error      text        NOT NULL,
    traceback  text        NOT NULL,
    attempts   integer     NOT NULL,
    group_name text        NOT NULL,
    consumer   text        NOT NULL,
    handler    text        NOT NULL,
    stream     text        NOT NULL,
    entry_id   text        NOT NULL,
    failed_at  timestamptz,
    entry      jsonb       NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now()
);

-- What each bot subscribes to: a type pattern and bus.conditions.Where conditions.
CREATE TABLE event_subscriptions (
    subscriber text        NOT NULL,
    pattern    text        NOT NULL,
    conditions jsonb       NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber, pattern)
);

-- The highest entry id archived per stream NAME (trimming stays below it).
CREATE TABLE archive_state (
    stream        text        PRIMARY KEY,
    last_entry_id text        NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
"""

_V2 = """
-- The exact bytes of a dead-lettered entry that was not UTF-8: a JSON array of base64
-- strings, [name, value, ...]; NULL when the entry was text (then `entry` holds it whole).
ALTER TABLE dead_letters ADD COLUMN raw jsonb;
"""

_V3 = """
-- What each consumer group has acked, per stream NAME: every entry at or below
-- (acked_ms, acked_seq) is acked by group_name. Recorded by the manager and only ever moved
-- forward (bus.archive.group_positions); read by the restore after Redis lost data.
-- updated_at: when the position last moved.
CREATE TABLE group_positions (
    stream     text        NOT NULL,
    group_name text        NOT NULL,
    acked_ms   bigint      NOT NULL,
    acked_seq  bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, group_name)
);
"""

_V4 = """
-- Operator actions (bus.archive.audit_log): who (token:<name> or user:<name>), through
-- what (api, socket, cli), what and on what, and how it ended. Deleted by retention.
CREATE TABLE audit_log (
    id      uuid        PRIMARY KEY,
    at      timestamptz NOT NULL,
    actor   text        NOT NULL,
    channel text        NOT NULL,
    action  text        NOT NULL,
    target  text,
    detail  jsonb       NOT NULL DEFAULT '{}',
    outcome text        NOT NULL,
    error   text
);
CREATE INDEX audit_log_at ON audit_log (at, id);
"""

_V5 = """
-- What each delivery of an event to a consumer group came to (bus.archive.deliveries),
-- reported by the consumers with their acks: one row per outcome. Partitioned like events
-- by the EVENT's created_at (deliveries_YYYYMMDD), so retention drops a day of deliveries
-- with its day of events. The group is 'bot-group-' || bot. outcome: handled,
-- dead_lettered, skipped (by where conditions), retried (left pending); attempts: Redis's
-- delivery count; held_ms: from the consumer reading it to the outcome (read at done_at
-- minus held_ms); previous: the consumer it was taken over from; retry: sent to this group
-- alone by a dead-letter retry. Fixed-width columns first: no padding between them.
CREATE TABLE deliveries (
    created_at timestamptz NOT NULL,
    done_at    timestamptz NOT NULL,
    event_id   uuid        NOT NULL,
    handler_ms real        NOT NULL,
    held_ms    real        NOT NULL,
    attempts   smallint    NOT NULL,
    retry      boolean     NOT NULL DEFAULT false,
    bot        text        NOT NULL,
    outcome    text        NOT NULL,
    consumer   text        NOT NULL,
    entry_id   text        NOT NULL,
    previous   text
) PARTITION BY RANGE (created_at);
-- Equality lookups only: a hash index (37 bytes a row) is smaller than a btree (44).
CREATE INDEX deliveries_event_id ON deliveries USING hash (event_id);

-- Which subscriber declared which pattern when: a row per declaration, valid_to set when
-- it was withdrawn or changed. type_regex matches '.' || type (bus.patterns.Pattern), so
-- SQL can tell which groups should have received an event.
CREATE TABLE subscription_history (
    subscriber text        NOT NULL,
    pattern    text        NOT NULL,
    type_regex text        NOT NULL,
    conditions jsonb       NOT NULL DEFAULT '{}',
    valid_from timestamptz NOT NULL,
    valid_to   timestamptz
);
CREATE INDEX subscription_history_subscriber ON subscription_history (subscriber, valid_from);

-- A dead letter looked up by its event (the delivery trail shows its DLQ id).
CREATE INDEX dead_letters_event_id ON dead_letters (event_id);
"""

_V6 = """
-- The compact layout of events (bus.archive.block_writes): the events of each stream are kept
-- 32 at a time in a block, compressed (bus.archive.block_codec), and each event has a
-- narrow head row for queries by time, type and source. Both are partitioned by day of
-- the events' created_at like events was (event_heads_YYYYMMDD, event_blocks_YYYYMMDD,
-- event_odd_ids_YYYYMMDD), so retention drops a day whole. events stays for the days
-- written before this version; readers read both until retention has dropped them.

-- Kinds of events: each (type, source) pair, numbered for the heads (bus.archive.names).
-- -32768 stands for a pair the numbering had no room for (the block still holds both).
CREATE TABLE event_kinds (
    id     smallint GENERATED BY DEFAULT AS IDENTITY (MINVALUE -32767 START WITH -32767)
           PRIMARY KEY,
    type   text COLLATE "C" NOT NULL,
    source text COLLATE "C" NOT NULL,
    UNIQUE (type, source)
);

-- Zstandard dictionaries blocks are compressed with (bus.archive.dictionaries); kept.
CREATE TABLE event_dictionaries (
    id         integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    dict       bytea       NOT NULL
);

-- Block ids, reused only after 2^27 blocks (loc = block * 32 + position fits an integer);
-- a block is unique within its day.
CREATE SEQUENCE event_block_ids AS integer
    MINVALUE -67108864 MAXVALUE 67108863 START WITH 0 CYCLE;

-- One row per event: loc is (block id * 32 + the event's position in it), kind_id its
-- (type, source).
CREATE TABLE event_heads (
    created_at timestamptz NOT NULL,
    loc        integer     NOT NULL,
    kind_id    smallint    NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX event_heads_created_at ON event_heads (created_at);
CREATE INDEX event_heads_kind_created_at ON event_heads (kind_id, created_at);

-- Up to 32 events of one stream and one day, in entry order. ids holds 16 bytes per event,
-- its id when a canonical UUID (else zeros, and event_odd_ids has it); correlations the
-- distinct canonical correlation ids; body the compressed events (bus.archive.block_codec);
-- dict_id the dictionary the body was compressed with (NULL: none, the first blocks).
-- created_from is the earliest created_at in the block (its day).
CREATE TABLE event_blocks (
    block        integer     NOT NULL,
    created_from timestamptz NOT NULL,
    created_to   timestamptz NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    first_ms     bigint      NOT NULL,
    first_seq    bigint      NOT NULL,
    last_ms      bigint      NOT NULL,
    last_seq     bigint      NOT NULL,
    n            smallint    NOT NULL,
    dict_id      integer,
    stream       text        NOT NULL,
    ids          bytea       NOT NULL,
    correlations uuid[]      NOT NULL,
    body         bytea       NOT NULL,
    PRIMARY KEY (block, created_from)
) PARTITION BY RANGE (created_from);
ALTER TABLE event_blocks ALTER COLUMN body SET STORAGE EXTERNAL;  -- compressed already
CREATE INDEX event_blocks_stream_first ON event_blocks (stream, first_ms, first_seq);
CREATE INDEX event_blocks_correlations ON event_blocks USING gin (correlations)
    WITH (fastupdate = off);

-- What the UUID indexes cannot find: kind 'i' an event id that is no canonical UUIDv7 of
-- its created_at's millisecond, 'c' a correlation id that is no canonical UUID.
CREATE TABLE event_odd_ids (
    created_at timestamptz NOT NULL,
    loc        integer     NOT NULL,
    kind       "char"      NOT NULL,
    value      text        NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX event_odd_ids_value ON event_odd_ids (value, kind);

-- Every archived event's id, type, source and times, both layouts, for SQL that needs no
-- payload (the missed-deliveries count, the soak's and the bench's checks, an operator's
-- ad-hoc query). The payload is compressed in the blocks: read it through the API or CLI.
-- A kind the numbering had no room for reads as NULL type and source here.
CREATE VIEW event_index AS
SELECT coalesce(
           o.value, encode(substring(b.ids FROM (h.loc & 31) * 16 + 1 FOR 16), 'hex')::uuid::text
       ) AS id, k.type, k.source, h.created_at, b.stored_at, b.stream
FROM event_heads h
JOIN event_blocks b
  ON b.block = h.loc >> 5
 AND b.created_from >= date_trunc('day', h.created_at, 'UTC')
 AND b.created_from < date_trunc('day', h.created_at, 'UTC') + interval '1 day'
LEFT JOIN event_kinds k ON k.id = h.kind_id
LEFT JOIN event_odd_ids o ON o.created_at = h.created_at AND o.loc = h.loc AND o.kind = 'i'
UNION ALL
SELECT id, type, source, created_at, stored_at, stream FROM events;
"""

#: Every migration, in version order. Append only.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events by day, dead letters, subscriptions, archive state", _V1),
    Migration(2, "dead letters keep the raw bytes of entries that were not UTF-8", _V2),
    Migration(3, "each consumer group's acked position per stream", _V3),
    Migration(4, "operator actions", _V4),
    Migration(5, "delivery records and the history of subscriptions", _V5),
    Migration(6, "compact event blocks with narrow heads", _V6),
)
#: The newest schema version this code knows.
LATEST_VERSION = MIGRATIONS[-1].version

#: Advisory lock key held (per transaction) while migrating: 'mbmig' in ASCII.
MIGRATION_LOCK = 0x6D_62_6D_69_67

# $1: the lock key (bigint). Returns nothing; waits until no other transaction holds it.
_LOCK = "SELECT pg_advisory_xact_lock($1)"
# No parameters. Returns nothing.
_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     integer     PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
# No parameters. Returns the newest applied version, 0 for an empty database.
_CURRENT = "SELECT coalesce(max(version), 0) FROM schema_version"
# $1: version (int), $2: description (text). Returns nothing.
_RECORD = "INSERT INTO schema_version (version, description) VALUES ($1, $2)"


async def migrate(db: Any) -> tuple[int, int]:
    """Bring the schema up to :data:`LATEST_VERSION`; return (version before, version after).

    ``db`` is an asyncpg connection or pool. Each missing migration runs in its own
    transaction holding an advisory lock, so managers starting at once apply each version
    exactly once (the others wait, then find it applied). Running it again is a no-op. A
    database newer than this code raises :class:`SchemaTooNewError` and is left untouched.
    """
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await _migrate(conn)
    return await _migrate(db)


async def _migrate(conn: Any) -> tuple[int, int]:
    before: int | None = None
    while True:
        async with conn.transaction():
            await conn.execute(_LOCK, MIGRATION_LOCK)
            await conn.execute(_CREATE_VERSION_TABLE)
            current = int(await conn.fetchval(_CURRENT))
            before = current if before is None else before
            if current > LATEST_VERSION:
                raise SchemaTooNewError(current, LATEST_VERSION)
            step = next((m for m in MIGRATIONS if m.version > current), None)
            if step is None:
                return before, current
            await conn.execute(step.sql)
            await conn.execute(_RECORD, step.version, step.description)
        log.info("archive schema migrated", version=step.version, description=step.description)
