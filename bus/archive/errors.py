"""Errors raised by the event archive. Every message says what to do about it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import asyncpg  # type: ignore[import-untyped]  # ships no type hints

from bus.errors import BusError
from bus.tls import POSTGRES_TLS, tls_problem


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


class ArchiveDataError(ArchiveError, ValueError):
    """PostgreSQL refused the data itself (SQLSTATE class 22 or 23, or a value asyncpg
    cannot encode): trying again will not help; the row must be set aside."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


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


#: SQLSTATE classes of errors in the data sent: data exception, integrity violation.
DATA_ERROR_CLASSES = ("22", "23")


def is_data_error(exc: BaseException) -> bool:
    """Whether PostgreSQL (or asyncpg, encoding a value) refused the data itself.

    Everything else - connection (08), resources such as a full disk or out of memory (53),
    operator intervention and statement timeouts (57), system errors (58), deadlocks and
    serialization failures (40), locks (55), a read-only server (25006), a schema to fix
    (42), an internal error (XX) - is the server's trouble, not the row's: the write is
    retried and the events wait in Redis.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in DATA_ERROR_CLASSES
    # asyncpg encoding a value: a number or date beyond its column, text that is not UTF-8
    return isinstance(exc, asyncpg.exceptions._base.DataError | OverflowError | UnicodeEncodeError)


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
def unavailable_on_failure(where: str, dsn: str | None = None) -> Iterator[None]:
    """Turn asyncpg's connection errors raised inside into :class:`ArchiveUnavailableError`;
    with ``dsn``, a failed TLS handshake says which of its TLS options to check."""
    try:
        yield
    except ArchiveError:
        raise
    except asyncpg.LockNotAvailableError as exc:
        raise ArchiveUnavailableError(
            f"PostgreSQL at {where} could not lock the events table in time to create or drop "
            "partitions (SQLSTATE 55P03: a long query holds it): retry later; events stay in "
            "Redis meanwhile"
        ) from exc
    except CONNECTION_ERRORS as exc:
        if dsn is not None and (problem := tls_problem(exc, dsn, POSTGRES_TLS)):
            raise ArchiveUnavailableError(
                f"{problem}; events stay in Redis until the archive is back"
            ) from exc
        raise ArchiveUnavailableError(
            f"PostgreSQL at {where} is unavailable ({type(exc).__name__}: {exc}): check that it "
            "is running and that the DSN's host, port, user, password and database are right; "
            "events stay in Redis until the archive is back"
        ) from exc
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OverflowError,
        UnicodeEncodeError,
    ) as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        if is_data_error(exc):
            raise ArchiveDataError(
                f"PostgreSQL at {where} refused the data (SQLSTATE {sqlstate or 'none'}, "
                f"{type(exc).__name__}: {exc})",
                sqlstate,
            ) from exc
        raise ArchiveUnavailableError(
            f"PostgreSQL at {where} cannot store or read now (SQLSTATE {sqlstate or 'none'}, "
            f"{type(exc).__name__}: {exc}): a full disk, a read-only server (a failover?), out "
            "of memory, a timeout or a lock; fix the server, events wait in Redis meanwhile"
        ) from exc
