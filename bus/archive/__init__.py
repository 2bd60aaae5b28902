"""The event archive: every event in PostgreSQL, partitioned by day, for queries and replay."""

from bus.archive.errors import (
    ArchiveError,
    ArchiveUnavailableError,
    CursorError,
    SchemaTooNewError,
)
from bus.archive.migrations import LATEST_VERSION, MIGRATIONS, Migration, migrate
from bus.archive.store import ArchiveStore

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "ArchiveError",
    "ArchiveStore",
    "ArchiveUnavailableError",
    "CursorError",
    "Migration",
    "SchemaTooNewError",
    "migrate",
]
