"""Fixtures of the TLS tests: the test PKI, and private Redis and PostgreSQL servers on TLS."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest

from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer
from tests.postgres_fixtures import stop_and_check
from tests.tls_support import CertKey, TestPKI, tls_postgres, tls_redis


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """The test CA and its certificates, made once per session."""
    return TestPKI.make(tmp_path_factory.mktemp("pki"))


class TlsRedisFactory(Protocol):
    """Starts a private redis-server on TLS only (see ``tests.tls_support.tls_redis``)."""

    async def __call__(
        self,
        *,
        cert: CertKey | None = None,
        client_certs: bool = False,
        password: str | None = None,
    ) -> RedisServer: ...


@pytest.fixture
async def tls_redis_factory(tmp_path: Path, pki: TestPKI) -> AsyncIterator[TlsRedisFactory]:
    """Private TLS redis-servers in tmp_path, stopped at teardown; skips the test when no
    redis-server here is built with TLS."""
    count = 0
    async with contextlib.AsyncExitStack() as cleanup:

        async def start(
            *,
            cert: CertKey | None = None,
            client_certs: bool = False,
            password: str | None = None,
        ) -> RedisServer:
            nonlocal count
            count += 1
            server = tls_redis(
                tmp_path / f"redis-tls-{count}",
                pki,
                cert=cert,
                client_certs=client_certs,
                password=password,
            )
            cleanup.push_async_callback(server.stop)
            await server.start()
            return server

        yield start


class TlsPostgresFactory(Protocol):
    """Starts a private PostgreSQL with ``ssl = on`` and the given server certificate."""

    async def __call__(self, cert: CertKey) -> PostgresServer: ...


@pytest.fixture
async def tls_postgres_factory(
    postgres_dir: Path, postgres_template: Path
) -> AsyncIterator[TlsPostgresFactory]:
    """Private PostgreSQL servers on TLS (a copy of the session's cluster each), stopped and
    checked at teardown."""
    count = 0
    async with contextlib.AsyncExitStack() as cleanup:

        async def start(cert: CertKey) -> PostgresServer:
            nonlocal count
            count += 1
            server = tls_postgres(postgres_dir / f"pg-tls-{count}", postgres_template, cert)
            cleanup.push_async_callback(stop_and_check, server)
            await server.start()
            return server

        yield start
