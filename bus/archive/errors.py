"""Errors raised by the event archive. Every message says what to do about it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import asyncpg  # type: ignore[import-untyped]  # ships no type hints

from bus.errors import BusError


class ArchiveError(BusError):
    """Root of every error the archive (PostgreSQL) raises."""


class SchemaTooNewError(ArchiveError):
    """The database was migrated by a newer multibot than this one; nothing was changed."""

    def __init__(self, database_version: int, code_version: int) -> None:
        super().__init__(
            f"the archive database is at schema version {database_version}, but this multibot "
            f"knows versions up to {code_version}: a newer multibot has migrated it; upgrade "
            "multibot on this host (never point an older multibot at a migrated database)"
        )
        self.database_version = database_version
        self.code_version = code_version


class ArchiveUnavailableError(ArchiveError, ConnectionError):
    """PostgreSQL could not be reached (or stayed locked); the operation did not happen."""


class CursorError(ArchiveError, ValueError):
    """A paging cursor is not one that :meth:`ArchiveStore.query` returned."""


#: What asyncpg raises when the server is unreachable, down, restarting, full, or refuses us.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, unreachable, DNS, and TimeoutError (connect timeout)
    asyncpg.PostgresConnectionError,  # class 08, incl. "connection was closed in the middle"
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,  # a connection cut mid-operation: "cannot switch to state"
    asyncpg.InvalidAuthorizationSpecificationError,  # unknown role, wrong password
    asyncpg.InvalidCatalogNameError,  # the database does not exist
)


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` of a DSN, without its user or password (for messages)."""
    try:
        parts = urlsplit(dsn)
        if not parts.scheme.startswith("postgres"):
            return "the configured DSN"
        host = parts.hostname or parse_qs(parts.query).get("host", ["localhost"])[0]
        return f"{host}:{parts.port or 5432}/{parts.path.lstrip('/')}"
    except ValueError:
        return "the configured DSN"


@contextlib.contextmanager
def unavailable_on_failure(where: str) -> Iterator[None]:
    """Turn asyncpg's connection errors raised inside into :class:`ArchiveUnavailableError`."""
    try:
        yield
    except ArchiveError:
        raise
    except asyncpg.LockNotAvailableError as exc:
        raise ArchiveUnavailableError(
            f"PostgreSQL at {where} could not lock the events table in time to create or drop "
            "partitions (a long query holds it): retry later; events stay in Redis meanwhile"
        ) from exc
    except CONNECTION_ERRORS as exc:
        raise ArchiveUnavailableError(
            f"PostgreSQL at {where} is unavailable ({type(exc).__name__}: {exc}): check that it "
            "is running and that the DSN's host, port, user, password and database are right; "
            "events stay in Redis until the archive is back"
        ) from exc
