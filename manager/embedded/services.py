"""The embedded Redis and PostgreSQL the manager runs when no URL or DSN is configured.

Their data lives under the data directory, so a restarted manager finds it again: Redis's
AOF under ``redis/`` (listening on a unix socket there, or with ``[redis_tls]`` on a TLS port
of 127.0.0.1 only; with a password generated once and kept in ``redis/password``),
PostgreSQL's cluster under ``postgres/`` (on a loopback port, with its own generated
password). They stop after the bots. Bots under other OS users cannot reach the socket in
the manager's private directory: for them Redis also listens on a loopback port (each bot
still logs in as its own ACL user).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from manager.config import ManagerSettings, RedisTlsSettings
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer
from manager.embedded.redis_tls import RedisTls
from manager.embedded.server import free_port

log = structlog.get_logger("manager.embedded.services")


def secret(path: Path) -> str:
    """The secret kept in ``path``, generated (and written with mode 0600) the first time."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


@dataclass
class Services:
    """Where Redis and PostgreSQL are, and the embedded servers the manager runs for them."""

    redis_url: str
    postgres_dsn: str | None
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None
    #: Where bots reach Redis, credentials not included: ``redis_url``'s server, on the
    #: loopback port of an embedded Redis when bots run as other OS users.
    bots_redis_url: str = ""

    @property
    def memory_pids(self) -> list[int]:
        """Pids whose memory counts in the budget besides the manager, the bots and Redis's
        ``used_memory``: the embedded PostgreSQL's."""
        pid = self.postgres.pid if self.postgres is not None else None
        return [pid] if pid else []

    async def stop(self) -> None:
        """Stop the embedded servers: PostgreSQL, then Redis."""
        if self.postgres is not None:
            await self.postgres.stop()
        if self.redis is not None:
            await self.redis.stop()


async def start_services(settings: ManagerSettings, *, bots_by_tcp: bool = False) -> Services:
    """Start what is not configured: Redis without ``redis_url``, PostgreSQL without a DSN.

    ``bots_by_tcp``: bots may run as other OS users, so an embedded Redis also listens on
    a loopback port for them.
    """
    data_dir = settings.data_dir
    services = Services(settings.redis_url or "", settings.postgres_dsn)
    services.bots_redis_url = services.redis_url
    try:
        if settings.redis_url is None:
            redis_dir = data_dir / "redis"
            maxmemory = settings.coordinator.memory.embedded_redis_maxmemory
            tls = _server_tls(settings.redis_tls)
            services.redis = RedisServer(
                redis_dir,
                port=free_port() if bots_by_tcp else None,
                password=secret(redis_dir / "password"),
                unix_socket=tls is None,
                tls=tls,
                appendfsync=settings.redis_appendfsync or "everysec",
                # Streams are the bus's data: never evicted. Full, Redis refuses writes, and
                # the pressure watch holds publishers back well before that.
                extra_config={"maxmemory": str(maxmemory), "maxmemory-policy": "noeviction"},
            )
            await services.redis.start()
            services.redis_url = services.bots_redis_url = services.redis.url
            if bots_by_tcp and tls is None:  # over TLS the URL is a loopback port already
                services.bots_redis_url = f"redis://127.0.0.1:{services.redis.port}/0"
            log.info("embedded redis-server started", data=str(redis_dir), tls=tls is not None)
        if settings.postgres_dsn is None:
            pg_dir = data_dir / "postgres"
            services.postgres = PostgresServer(
                pg_dir, password=secret(data_dir / "postgres.password")
            )
            await services.postgres.start(timeout=120)
            services.postgres_dsn = services.postgres.dsn
            log.info("embedded PostgreSQL started", data=str(pg_dir))
    except BaseException:
        await services.stop()
        raise
    return services


def _server_tls(settings: RedisTlsSettings) -> RedisTls | None:
    """The embedded redis-server's TLS, when the config asks for it."""
    if settings.cert_file is None or settings.key_file is None or settings.ca_file is None:
        return None
    return RedisTls(settings.cert_file, settings.key_file, settings.ca_file, settings.client_certs)
