"""The bus on Redis over TLS (``rediss://``) with the project's own CA: it works, and every
way TLS can be wrong is refused with an error that names TLS and what to check."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner, Result
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bus import BusClient, BusConnectionError, Event
from bus.connection import connect
from bus.keys import Keys
from bus.routing import DEFAULT_STREAM
from bus.settings import BusSettings
from manager.cli import main
from manager.daemon.redis_repair import check_redis
from manager.errors import ManagerError
from tests.support import running
from tests.tls.conftest import TlsRedisFactory
from tests.tls_support import CertKey, TestPKI, redis_tls_url

pytestmark = pytest.mark.redis


def settings(url: str) -> BusSettings:
    """Bus settings on ``url`` that fail at once instead of retrying a refused handshake."""
    return BusSettings.model_validate(
        {"redis_url": url, "connect_retries": 0, "consumer": {"block_ms": 500, "start_id": "0"}}
    )


async def round_trip(url: str) -> None:
    """Publish an event over ``url`` and wait until a consumer on ``url`` handled it."""
    handled: asyncio.Queue[Event] = asyncio.Queue()

    async def handle(event: Event) -> None:
        await handled.put(event)

    async with (
        BusClient("publisher", settings=settings(url)) as publisher,
        BusClient("consumer", settings=settings(url)) as consumer,
    ):
        consumer.subscribe("test.tls.*", handle)
        async with running(consumer):
            sent = await publisher.publish("test.tls.hello", {"over": "tls"})
            got = await asyncio.wait_for(handled.get(), 10)
    assert (got.id, got.data) == (sent, {"over": "tls"})


async def publish_error(url: str) -> str:
    """The message of the error publishing over ``url`` raises."""
    async with BusClient("publisher", settings=settings(url)) as publisher:
        with pytest.raises(BusConnectionError) as raised:
            await publisher.publish("test.tls.hello", {})
    return str(raised.value)


class TestBusOverTls:
    async def test_publishes_and_consumes_trusting_the_projects_ca(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """rediss://…?ssl_ca_certs=<the project's CA>: an event goes out and is handled."""
        server = await tls_redis_factory()
        await round_trip(redis_tls_url(server, pki.ca.cert))

    async def test_server_has_no_plain_listener(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """The TLS server's port takes no plain redis:// client, and it has no other port."""
        server = await tls_redis_factory()
        assert "port 0\n" in (server.data_dir / "redis.conf").read_text()
        plain = Redis.from_url(f"redis://localhost:{server.port}/0", socket_timeout=2)
        with pytest.raises(RedisConnectionError):
            await plain.ping()
        await plain.aclose()

    async def test_wrong_ca_is_refused_naming_ssl_ca_certs(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """A CA that did not sign the server's certificate: refused, saying which option."""
        server = await tls_redis_factory()
        message = await publish_error(redis_tls_url(server, pki.foreign_ca.cert))
        assert f"TLS with Redis at localhost:{server.port} failed" in message
        assert "not signed by a CA we trust" in message
        assert "set ssl_ca_certs to the file of the CA certificate" in message

    async def test_certificate_for_another_host_is_refused(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """A certificate signed by the right CA for another host name: refused, naming it."""
        server = await tls_redis_factory(cert=pki.other_host)
        message = await publish_error(redis_tls_url(server, pki.ca.cert))
        assert f"TLS with Redis at localhost:{server.port} failed" in message
        assert "not valid for the name 'localhost'" in message
        assert "subjectAltName" in message

    async def test_unreadable_ca_file_is_named(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """ssl_ca_certs naming no file: the error names the option and the path."""
        server = await tls_redis_factory()
        missing = pki.ca.directory / "missing.crt"
        message = await publish_error(redis_tls_url(server, missing))
        assert f"the file ssl_ca_certs={missing} is missing or not readable" in message


class TestClientCertificates:
    async def test_required_client_certificate_is_accepted(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """tls-auth-clients yes: ssl_certfile/ssl_keyfile signed by the CA get in."""
        server = await tls_redis_factory(client_certs=True)
        await round_trip(redis_tls_url(server, pki.ca.cert, pki.client))

    @pytest.mark.parametrize("which", [None, "intruder"])
    async def test_without_an_accepted_certificate_is_refused(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI, which: str | None
    ) -> None:
        """No client certificate, or one of another CA: refused, saying what to give.

        Under TLS 1.3 the client may see the server's alert or only the connection cut
        right after it: either way the message names the client certificate options.
        """
        server = await tls_redis_factory(client_certs=True)
        cert: CertKey | None = getattr(pki, which) if which else None
        message = await publish_error(redis_tls_url(server, pki.ca.cert, cert))
        assert f"Redis at localhost:{server.port}" in message
        assert "TLS" in message
        assert "signed by a CA the server trusts" in message
        assert "ssl_certfile" in message


class TestOperatorErrors:
    async def test_manager_start_check_names_tls(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """The manager's start check: a TLS failure is a ManagerError saying what to fix."""
        server = await tls_redis_factory()
        url = redis_tls_url(server, pki.foreign_ca.cert)
        with pytest.raises(ManagerError) as raised:
            await check_redis(connect(settings(url)), url)
        assert "TLS with Redis at localhost" in str(raised.value)
        assert "ssl_ca_certs" in str(raised.value)

    async def test_cli_says_tls_without_a_traceback(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """``multibot events publish`` over a refused handshake: exit 1, one clear line."""
        server = await tls_redis_factory()
        url = redis_tls_url(server, pki.foreign_ca.cert)
        result = await asyncio.to_thread(_cli, url, "events", "publish", "test.tls.hello")
        assert result.exit_code == 1
        assert "TLS with Redis at localhost" in result.output
        assert "ssl_ca_certs" in result.output
        assert "Traceback" not in result.output

    async def test_cli_works_over_tls(
        self, tls_redis_factory: TlsRedisFactory, pki: TestPKI
    ) -> None:
        """``multibot events publish`` with a rediss:// URL and the CA: the event is stored."""
        server = await tls_redis_factory()
        url = redis_tls_url(server, pki.ca.cert)
        result = await asyncio.to_thread(_cli, url, "events", "publish", "test.tls.hello")
        assert result.exit_code == 0, result.output
        async with connect(settings(url)) as redis:
            assert await redis.xlen(Keys().stream(DEFAULT_STREAM)) == 1


def _cli(url: str, *args: str) -> Result:
    """``multibot ARGS`` in-process, on ``url`` (in a thread: it runs its own event loop)."""
    return CliRunner().invoke(main, list(args), env={"MULTIBOT_REDIS_URL": url})
