"""The manager's one pool to the archive: opened and migrated on first use, retried after.

PostgreSQL being down must not stop the manager: the archiver keeps events in Redis and
retries. A schema newer than this code is different: that is refused at start.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from bus.archive.errors import ArchiveUnavailableError, SchemaTooNewError
from bus.archive.store import ArchiveStore
from bus.keys import Keys

log = structlog.get_logger("manager.archive")


class ArchiveLink:
    """Hands out the one :class:`ArchiveStore`; :meth:`get` connects (and migrates) once."""

    def __init__(self, dsn: str, keys: Keys) -> None:
        self._dsn = dsn
        self._keys = keys
        self._store: ArchiveStore | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        """Whether the pool is open (its connections may still fail)."""
        return self._store is not None

    async def get(self) -> ArchiveStore:
        """The store; connects and applies migrations the first time. Raises
        ArchiveUnavailableError while PostgreSQL is away, SchemaTooNewError if it is newer."""
        async with self._lock:
            if self._store is None:
                store = await ArchiveStore.connect(self._dsn, keys=self._keys)
                try:
                    before, after = await store.migrate()
                except BaseException:
                    await store.close()
                    raise
                if before != after:
                    log.info("archive schema migrated", from_version=before, to_version=after)
                self._store = store
            return self._store

    async def try_at_start(self) -> None:
        """Connect now if PostgreSQL is there (a newer schema is fatal); else go on."""
        try:
            await self.get()
        except SchemaTooNewError:
            raise
        except ArchiveUnavailableError as exc:
            log.warning("PostgreSQL unavailable at start: events wait in Redis", error=str(exc))

    async def close(self) -> None:
        """Close the pool."""
        if self._store is not None:
            await self._store.close()
            self._store = None


# The role bots read the archive as. Statements take no parameters ($n): DDL cannot; the
# password is a generated URL-safe token, so it is safe to inline as a literal.
READER_ROLE = "multibot_reader"
#: What a bot's replay reads: both layouts of events (bus.archive.event_reads).
EVENT_TABLES = (
    "events", "event_heads", "event_blocks", "event_odd_ids", "event_kinds",
    "event_dictionaries", "event_index",
)  # fmt: skip


async def ensure_reader(store: ArchiveStore, dsn: str, password: str) -> str:
    """A read-only role for bots (SELECT on the tables of events only); its DSN, based on
    ``dsn``."""
    if not password.replace("-", "").replace("_", "").isalnum():
        raise ValueError("the reader password must be URL-safe")
    statements = [
        f"""DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                CREATE ROLE {READER_ROLE} LOGIN;
              END IF;
            END $$""",
        f"ALTER ROLE {READER_ROLE} LOGIN PASSWORD '{password}'",
        f"GRANT SELECT ON {', '.join(EVENT_TABLES)} TO {READER_ROLE}",
    ]
    async with store.connection() as conn:
        for statement in statements:
            await conn.execute(statement)
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {READER_ROLE}')
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{READER_ROLE}:{quote(password, safe='')}@{host}"))
