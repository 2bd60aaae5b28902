"""``multibot start`` on Redis over TLS, as a real process: with a ``rediss://`` redis_url
(client certificates required) and with its embedded redis-server on TLS only. Its bots
get the CA, their own client certificate and never the manager's."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusClient
from bus.keys import Keys
from bus.settings import BusSettings
from manager.config import load_config
from manager.embedded.postgres_server import PostgresServer
from tests.daemon.manager_process import FAST, REPO, ManagerProcess, bot_toml, events
from tests.support import wait_until
from tests.tls.conftest import TlsRedisFactory
from tests.tls_support import TestPKI, redis_tls_url

KEYS = Keys("multibot")
REPORTER = bot_toml("reporter", "tests.tls.tls_bots:reporter")


def tls_section(**files: Path | str | bool) -> str:
    """A ``[redis_tls]`` table."""
    lines = ["[redis_tls]"]
    for key, value in files.items():
        lines.append(
            f"{key} = {str(value).lower()}" if isinstance(value, bool) else f'{key} = "{value}"'
        )
    return "\n".join(lines) + "\n"


async def reported_url(redis: Redis) -> Mapping[str, Any]:
    """What the reporter bot said about its Redis URL (waits for it)."""
    found: list[Mapping[str, Any]] = []

    async def said() -> bool:
        found[:] = [e.data for e in await events(redis, KEYS, "test.tls.url")]
        return bool(found)

    await wait_until(said, 20, "the bot to report its URL")
    return found[0]


async def wait_for_pong(redis: Redis, n: int) -> None:
    """Wait until the reporter bot answered the ping numbered ``n``."""

    async def answered() -> bool:
        return any(
            e.data.get("n") == n and e.source == "reporter"
            for e in await events(redis, KEYS, "test.tls.pong")
        )

    await wait_until(answered, 20, f"the bot to answer ping {n}")


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
class TestManagerOnTls:
    async def test_rediss_url_with_client_certificates(
        self,
        tmp_path: Path,
        tls_redis_factory: TlsRedisFactory,
        pki: TestPKI,
        postgres_server: PostgresServer,
    ) -> None:
        """redis_url = rediss://…?ssl_ca_certs&ssl_certfile&ssl_keyfile on a Redis requiring
        client certificates: the bot consumes and publishes with the CA and the bots'
        certificate; the manager's certificate and key never reach it."""
        server = await tls_redis_factory(client_certs=True)
        admin_url = redis_tls_url(server, pki.ca.cert, pki.client)
        config = (
            f'data_dir = "data"\nredis_url = "{admin_url}"\n'
            f'postgres_dsn = "{postgres_server.dsn}"\n'
            + tls_section(bot_cert_file=pki.bot.cert, bot_key_file=pki.bot.key)
            + FAST
            + REPORTER
        )
        manager = ManagerProcess(tmp_path, config)
        try:
            await manager.start()
            async with Redis.from_url(admin_url, decode_responses=True) as redis:
                reported = await reported_url(redis)
                assert reported["scheme"] == "rediss"
                assert reported["query"] == {
                    "ssl_ca_certs": str(pki.ca.cert),
                    "ssl_certfile": str(pki.bot.cert),
                    "ssl_keyfile": str(pki.bot.key),
                }
                async with BusClient("tester", settings=BusSettings(redis_url=admin_url)) as bus:
                    await bus.publish("test.tls.ping", {"n": 1})
                await wait_for_pong(redis, 1)
            assert await manager.terminate() == 0
        finally:
            await manager.kill()

    async def test_embedded_redis_listens_on_tls_only(
        self, tmp_path: Path, pki: TestPKI, postgres_server: PostgresServer
    ) -> None:
        """No redis_url and [redis_tls]: the embedded redis-server has no plain port; the
        manager, the bot and the CLI all reach it with rediss:// and the CA."""
        config = (
            f'data_dir = "data"\npostgres_dsn = "{postgres_server.dsn}"\n'
            + tls_section(cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca.cert)
            + FAST
            + REPORTER
        )
        manager = ManagerProcess(tmp_path, config)
        try:
            await manager.start()
            redis_conf = (manager.data_dir / "redis" / "redis.conf").read_text()
            assert "port 0\n" in redis_conf
            assert "tls-port " in redis_conf
            assert "unixsocket" not in redis_conf
            url = (await manager.command("connection"))["redis_url"]
            assert url.startswith("rediss://")
            async with Redis.from_url(url, decode_responses=True) as redis:
                reported = await reported_url(redis)
                assert reported["scheme"] == "rediss"
                assert reported["query"] == {"ssl_ca_certs": str(pki.ca.cert)}
                published = await asyncio.to_thread(
                    _cli,
                    manager.config_path,
                    "events",
                    "publish",
                    "test.tls.ping",
                    "--data",
                    '{"n": 2}',
                )
                assert published.returncode == 0, published.stderr
                await wait_for_pong(redis, 2)
            assert await manager.terminate() == 0
        finally:
            await manager.kill()


class TestTlsConfig:
    def test_relative_files_are_resolved_against_the_config(
        self, tmp_path: Path, pki: TestPKI
    ) -> None:
        """[redis_tls] files given relative to the config file are found next to it."""
        (tmp_path / "tls").mkdir()
        for source in (pki.server.cert, pki.server.key, pki.ca.cert):
            shutil.copyfile(source, tmp_path / "tls" / source.name)
        config = tmp_path / "multibot.toml"
        config.write_text(
            tls_section(cert_file="tls/server.crt", key_file="tls/server.key", ca_file="tls/ca.crt")
        )
        tls = load_config(config).redis_tls
        assert (tls.cert_file, tls.key_file, tls.ca_file) == (
            tmp_path / "tls" / "server.crt",
            tmp_path / "tls" / "server.key",
            tmp_path / "tls" / "ca.crt",
        )

    @pytest.mark.parametrize(
        ("section", "expected"),
        [
            ({"key_file": "server.key"}, "redis_tls: give cert_file, key_file and ca_file "
             "together for the embedded redis-server on TLS (cert_file, ca_file missing)"),
            ({"cert_file": "server.crt", "key_file": "server.key", "ca_file": "nowhere.crt"},
             "redis_tls.ca_file: {dir}/nowhere.crt is not a file we can read"),
            ({"cert_file": "server.crt", "key_file": "manager.key", "ca_file": "ca.crt"},
             "redis_tls: cert_file and key_file do not load as a certificate and its key"),
            ({"cert_file": "server.crt", "key_file": "server.key", "ca_file": "ca.crt",
              "client_certs": True}, "redis_tls: client_certs needs bot_cert_file and "
             "bot_key_file: bots must present a certificate too, and never get the manager's"),
        ],
    )  # fmt: skip
    def test_start_refuses_with_the_reason(
        self, tmp_path: Path, pki: TestPKI, section: dict[str, Any], expected: str
    ) -> None:
        """A missing file, a key without its certificate, a mismatched pair, client
        certificates without the bots' own: start refuses before anything runs."""
        files = pki.ca.directory
        values = {k: v if isinstance(v, bool) else files / v for k, v in section.items()}
        config = tmp_path / "multibot.toml"
        config.write_text('data_dir = "data"\n' + tls_section(**values) + REPORTER)
        started = _cli(config, "start")
        assert started.returncode == 1
        assert expected.format(dir=files) in started.stderr, started.stderr
        assert "Traceback" not in started.stderr
        assert not (tmp_path / "data").exists()

    def test_redis_url_with_server_files_is_refused(self, tmp_path: Path, pki: TestPKI) -> None:
        """With redis_url set there is no embedded server to put TLS on: say where TLS goes."""
        config = tmp_path / "multibot.toml"
        section = tls_section(
            cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca.cert
        )
        config.write_text('redis_url = "redis://localhost:1/0"\n' + section)
        started = _cli(config, "start")
        assert started.returncode == 1
        assert (
            "redis_tls: cert_file, key_file, ca_file and client_certs set up the embedded"
            in started.stderr
        )
        assert "rediss://…?ssl_ca_certs=CA" in started.stderr


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``multibot ARGS`` as a real process, with ``config`` as this machine's config."""
    return subprocess.run(
        [sys.executable, "-m", "manager.cli", *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
        env={**os.environ, "MULTIBOT_CONFIG": str(config)},
    )  # fmt: skip
