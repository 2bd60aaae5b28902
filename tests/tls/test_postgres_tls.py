"""The archive on PostgreSQL with ``sslmode=verify-full``: it stores over TLS, and a server
certificate it cannot verify is refused with an error naming TLS and what to check."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bus.archive import ArchiveStore, ArchiveUnavailableError
from bus.event import Event
from bus.keys import Keys
from tests.tls.conftest import TlsPostgresFactory
from tests.tls_support import TestPKI, verify_full_dsn

pytestmark = pytest.mark.postgres


class TestVerifyFull:
    async def test_archive_stores_over_tls(
        self, tls_postgres_factory: TlsPostgresFactory, pki: TestPKI
    ) -> None:
        """verify-full with the test CA: the store migrates, writes and reads, over TLS."""
        server = await tls_postgres_factory(pki.server)
        event = Event(
            type="test.tls.stored", data={"n": 1}, source="t", timestamp=datetime.now(UTC)
        ).with_delivery(Keys().stream("bot"), "1-1")
        async with await ArchiveStore.connect(verify_full_dsn(server, pki.ca.cert)) as store:
            await store.migrate()
            assert await store.insert_events([event]) == 1
            assert (await store.get(event.id)) == event
            async with store.connection() as conn:
                # pg_stat_ssl: one row per backend, ssl true when its connection uses TLS.
                used = await conn.fetchval(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
            assert used is True

    async def test_certificate_for_another_host_is_refused(
        self, tls_postgres_factory: TlsPostgresFactory, pki: TestPKI
    ) -> None:
        """A certificate signed by the CA for another host name: refused, naming the host."""
        server = await tls_postgres_factory(pki.other_host)
        with pytest.raises(ArchiveUnavailableError) as raised:
            await ArchiveStore.connect(verify_full_dsn(server, pki.ca.cert), connect_timeout=5)
        message = str(raised.value)
        assert f"TLS with PostgreSQL at localhost:{server.port} failed" in message
        assert "not valid for the name 'localhost'" in message
        assert "subjectAltName" in message

    async def test_wrong_ca_is_refused_naming_sslrootcert(
        self, tls_postgres_factory: TlsPostgresFactory, pki: TestPKI
    ) -> None:
        """sslrootcert of a CA that did not sign the server's certificate: refused, saying so."""
        server = await tls_postgres_factory(pki.server)
        with pytest.raises(ArchiveUnavailableError) as raised:
            await ArchiveStore.connect(
                verify_full_dsn(server, pki.foreign_ca.cert), connect_timeout=5
            )
        message = str(raised.value)
        assert f"TLS with PostgreSQL at localhost:{server.port} failed" in message
        assert "set sslrootcert to the file of the CA certificate" in message
