"""Fixtures of the daemon tests: a real ``multibot start`` on the test's private Redis."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from bus.keys import Keys
from manager.embedded.postgres_server import PostgresServer
from tests.daemon.manager_process import FAST, ManagerProcess


class ManagerFactory(Protocol):
    """Starts a manager running ``bots`` (``[[bots]]`` tables) on the test's Redis."""

    async def __call__(
        self, bots: str, *, extra: str = "", wait_ready: bool = True
    ) -> ManagerProcess: ...


@pytest.fixture
async def manager_factory(
    tmp_path: Path, redis_url: str, postgres_server: PostgresServer
) -> AsyncIterator[ManagerFactory]:
    """Managers as real subprocesses on the test's Redis and PostgreSQL (its archive);
    each is SIGKILLed at teardown if still running."""
    started: list[ManagerProcess] = []

    async def start(bots: str, *, extra: str = "", wait_ready: bool = True) -> ManagerProcess:
        work = tmp_path / f"manager-{len(started)}"
        work.mkdir()
        header = (
            f'data_dir = "data"\nredis_url = "{redis_url}"\n'
            f'postgres_dsn = "{postgres_server.dsn}"\n'
        )
        manager = ManagerProcess(work, header + extra + FAST + bots)
        started.append(manager)
        await manager.start(wait_ready=wait_ready)
        return manager

    yield start
    for manager in started:
        await manager.kill()


@pytest.fixture
def keys() -> Keys:
    """The default namespace's keys."""
    return Keys("multibot")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory another OS user can reach (as root, embedded PostgreSQL runs as one);
    pytest's own tmp_path sits under a 0700 directory of root."""
    directory = Path(tempfile.mkdtemp(prefix="multibot-daemon-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
