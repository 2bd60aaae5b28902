"""Fixtures the archive tests of this folder share: the manager's Redis client, the
archive, the archiver's way to it, and a PostgreSQL superuser to break the archive with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import pytest
from redis.asyncio import Redis

from bus.archive import ArchiveStore
from bus.connection import connect
from bus.settings import BusSettings
from manager.archive.link import ArchiveLink
from manager.embedded.postgres_server import PostgresServer
from tests.manager.archive.archive_support import KEYS


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    """The manager's own Redis client, as the daemon makes it."""
    redis = connect(BusSettings(redis_url=redis_url), client_name="multibot-manager")
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
def archive(store: ArchiveStore) -> ArchiveStore:
    """A migrated store on the test's PostgreSQL, to look at what was archived."""
    return store


@pytest.fixture
async def link(postgres_server: PostgresServer) -> AsyncIterator[ArchiveLink]:
    """The archiver's way to the store, as the daemon makes it."""
    archive_link = ArchiveLink(postgres_server.dsn, KEYS)
    try:
        yield archive_link
    finally:
        await archive_link.close()


@pytest.fixture
async def superuser(postgres_server: PostgresServer) -> AsyncIterator[Any]:
    """A connection to the test's PostgreSQL as its superuser, to break it."""
    conn = await asyncpg.connect(postgres_server.dsn, timeout=5)
    try:
        yield conn
    finally:
        await conn.close()
