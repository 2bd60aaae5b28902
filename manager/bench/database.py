"""The PostgreSQL of a ``--deliveries`` run: a database of its own for the delivery records.

On the server ``--postgres-dsn`` names, or on a private one started for the run in a
temporary directory and removed after it (as root it runs as another OS user, see
:class:`~manager.embedded.postgres_server.PostgresServer`). Either way the records go to a
database created for the run (``multibot_bench_<hex>``) and dropped at the end: the disk
measured is this run's rows only, and an archive the DSN points at is never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from bus.archive.errors import ArchiveError, describe_dsn
from bus.archive.store import ArchiveStore
from manager.bench.options import BenchError
from manager.embedded.postgres_server import PostgresServer

log = structlog.get_logger("manager.bench")

_CONNECT_TIMEOUT = 10.0
_START_TIMEOUT = 120.0  # initdb on a busy 2-core box with a slow disk
# No parameters. Returns the bytes of every partition of deliveries, with their indexes,
# TOAST, free space and visibility maps (0 when there is none).
_DELIVERIES_SIZE = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'deliveries'::regclass
"""


@contextlib.asynccontextmanager
async def bench_archive(dsn: str | None) -> AsyncIterator[ArchiveStore]:
    """A migrated archive store on a database created for the run, on ``dsn``'s server or
    (None) on a private one; the database (and the private server) is gone afterwards."""
    async with _server(dsn) as server_dsn, _fresh_database(server_dsn) as run_dsn:
        try:
            store = await ArchiveStore.connect(run_dsn, connect_timeout=_CONNECT_TIMEOUT)
            await store.migrate()
        except ArchiveError as exc:
            raise BenchError(f"cannot set up the bench archive: {exc}") from exc
        try:
            yield store
        finally:
            await store.close()


async def deliveries_disk_bytes(store: ArchiveStore) -> int:
    """What the ``deliveries`` partitions take on disk, in bytes."""
    async with store.connection() as conn:
        size: int = await conn.fetchval(_DELIVERIES_SIZE)
    return size


@contextlib.asynccontextmanager
async def _server(dsn: str | None) -> AsyncIterator[str]:
    """``dsn``, or the DSN of a private PostgreSQL started for the run and removed after."""
    if dsn is not None:
        yield dsn
        return
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-pg-"))
    try:
        os.chmod(work, 0o711)  # as root the private PostgreSQL runs as another user
        server = PostgresServer(work / "postgres")
        await server.start(timeout=_START_TIMEOUT)
        try:
            yield server.dsn
        finally:
            await server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def _fresh_database(dsn: str) -> AsyncIterator[str]:
    """Create an empty database on ``dsn``'s server; yield its DSN; drop it at the end."""
    name = f"multibot_bench_{secrets.token_hex(4)}"
    # Identifier of our own making (hex): DDL takes no bind parameters. Returns nothing.
    await _execute(dsn, f'CREATE DATABASE "{name}"', "create a database for the run")
    log.debug("bench database created", database=name, server=describe_dsn(dsn))
    try:
        yield with_database(dsn, name)
    finally:
        try:
            # FORCE (PostgreSQL 13+): ends sessions a cancelled run left. Returns nothing.
            await _execute(
                dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"drop database {name}"
            )
        except BenchError as exc:  # must not hide what ended the run; the report stands
            log.warning("bench database left behind: drop it by hand", error=str(exc))


def with_database(dsn: str, name: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) pointing at database ``name`` instead."""
    parts = urlsplit(dsn)
    if not parts.scheme.startswith("postgres"):
        raise BenchError("--postgres-dsn must be a postgresql:// URL")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("dbname", "database")]
    return urlunsplit(parts._replace(path=f"/{name}", query=urlencode(query)))


async def _execute(dsn: str, statement: str, what: str) -> None:
    where = describe_dsn(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise BenchError(
            f"cannot reach PostgreSQL at {where} to {what} ({type(exc).__name__}: {exc}): "
            "check --postgres-dsn, or leave it unset to run a private PostgreSQL"
        ) from exc
    try:
        await conn.execute(statement)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise BenchError(
            f"PostgreSQL at {where} refused to {what} ({exc}): the bench keeps its records "
            "in a database of its own; grant the role CREATEDB, or leave --postgres-dsn "
            "unset to run a private PostgreSQL"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise BenchError(f"PostgreSQL at {where} failed to {what}: {exc}") from exc
    finally:
        await conn.close(timeout=_CONNECT_TIMEOUT)
