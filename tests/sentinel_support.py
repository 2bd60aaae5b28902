"""A private Sentinel deployment for tests: the test's redis-server as the primary, one
replica and three sentinels (quorum 2), all real redis-server processes on free ports, so a
test can SIGKILL the primary and watch the sentinels promote the replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from manager.embedded.redis_server import RedisBinary, RedisServer
from tests.support import wait_until

SERVICE = "multibot-primary"
#: Sentinels call the primary down after this long without an answer (fast for tests).
DOWN_AFTER_MS = 1000


class SentinelServer(RedisServer):
    """``redis-server --sentinel`` watching ``primary_port`` as :data:`SERVICE`."""

    def __init__(
        self, data_dir: Path, *, binary: RedisBinary, primary_port: int, password: str | None
    ) -> None:
        super().__init__(data_dir, binary=binary)
        self._primary_port = primary_port
        self._primary_password = password

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"port {self._port}",
            "daemonize no",
            f'dir "{self._data_dir}"',
            f'logfile "{self.log_path}"',
            f"sentinel monitor {SERVICE} 127.0.0.1 {self._primary_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} 5000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if self._primary_password is not None:
            lines.append(f"sentinel auth-pass {SERVICE} {self._primary_password}")
        return "".join(f"{line}\n" for line in lines)

    def _command(self, binary: RedisBinary) -> list[str | Path]:
        return [binary.path, self._config_path, "--sentinel"]

    async def _answers(self, pid: int, io_timeout: float) -> bool:
        """A sentinel has no dataset to load: it is up once it answers as our process."""
        try:
            async with self._client(io_timeout) as client:
                info = await client.info("server")
        except (RedisError, OSError):
            return False
        return bool(info.get("process_id") == pid)


@dataclass
class SentinelSet:
    """The running deployment; ``url`` is what a bus client is given."""

    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]
    password: str | None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0"

    async def primary_port(self) -> int | None:
        """The port the first sentinel that answers calls the primary's."""
        for sentinel in self.sentinels:
            with contextlib.suppress(RedisError, OSError):
                async with _plain(sentinel.url) as client:
                    reply = await client.execute_command(  # type: ignore[no-untyped-call]
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                    )
                    return int(reply[1])
        return None

    async def agreed_primary_port(self) -> int | None:
        """The primary's port when every sentinel names the same one, else None (a failover
        is still spreading)."""
        ports = set()
        for sentinel in self.sentinels:
            try:
                async with _plain(sentinel.url) as client:
                    reply = await client.execute_command(  # type: ignore[no-untyped-call]
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                    )
                    ports.add(int(reply[1]))
            except (RedisError, OSError):
                return None
        return ports.pop() if len(ports) == 1 else None

    async def wait_ready(self, *, sentinels_know_each_other: bool = False) -> None:
        """Until the replica is in sync and every sentinel answers (and, if asked, knows the
        replica and the other sentinels: needed before a failover can be voted, and takes
        seconds, as sentinels poll and greet every few)."""

        async def ready() -> bool:
            for sentinel in self.sentinels if sentinels_know_each_other else ():
                with contextlib.suppress(RedisError, OSError):
                    async with _plain(sentinel.url) as client:
                        fields: Any = await client.sentinel_master(SERVICE)
                        if int(fields["num-slaves"]) < 1:
                            return False
                        others = int(fields["num-other-sentinels"])
                        if sentinels_know_each_other and others < len(self.sentinels) - 1:
                            return False
                        continue
                return False
            async with _plain(self.replica.url) as replica:
                info = await replica.info("replication")
            return bool(info.get("master_link_status") == "up") and (
                await self.primary_port() == self.primary.port
            )

        await wait_until(ready, 30, "the Sentinel set to be ready")


async def _no_shutdown_wait(server: RedisServer) -> None:
    """Stop at once on SHUTDOWN: Redis 7 waits up to 10 s for lagging replicas (or for a
    primary that is gone); 6.2 has no such wait, nor the setting."""
    async with _plain(server.url) as client:
        with contextlib.suppress(ResponseError):
            await client.config_set("shutdown-timeout", 0)


def _plain(url: str) -> Redis:
    return Redis.from_url(
        url, decode_responses=True, retry=Retry(NoBackoff(), 0), socket_timeout=2.0
    )


@contextlib.asynccontextmanager
async def sentinel_set(
    primary: RedisServer, directory: Path, binary: RedisBinary, password: str | None
) -> AsyncIterator[SentinelSet]:
    """A replica of ``primary`` and three sentinels watching it, in ``directory``; stopped
    (whatever the test killed) on the way out."""
    port = primary.port
    assert port is not None, "the primary listens on a TCP port"
    auth = {"masterauth": password} if password else {}
    servers: list[RedisServer] = []
    async with _plain(primary.url) as client:  # a replica's first sync at once, not in 5 s
        await client.config_set("repl-diskless-sync-delay", 0)
    await _no_shutdown_wait(primary)
    try:
        replica = RedisServer(
            directory / "replica",
            binary=binary,
            password=password,
            # No AOF: a replica still writing its first one refuses SHUTDOWN.
            extra_config={"replicaof": f"127.0.0.1 {port}", "appendonly": "no", **auth},
        )
        servers.append(replica)
        await replica.start()
        await _no_shutdown_wait(replica)
        sentinels = [
            SentinelServer(
                directory / f"sentinel-{n}", binary=binary, primary_port=port, password=password
            )
            for n in range(3)
        ]
        servers.extend(sentinels)
        await asyncio.gather(*(s.start() for s in sentinels))
        deployment = SentinelSet(primary, replica, sentinels, password)
        await deployment.wait_ready()
        yield deployment
    finally:
        for server in reversed(servers):
            with contextlib.suppress(Exception):
                await server.stop()
