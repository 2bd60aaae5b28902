"""Fixtures giving a test its own private PostgreSQL (about 0.3 s to copy a cluster and start).

initdb takes 1-2 s, so it runs once per session for a template cluster; each server starts
on a copy of it (the ``multibot`` database included). A copy cannot carry a password (a
cluster keeps the one initdb gave it), so servers with a password run their own initdb.

The data dirs live outside pytest's temp dirs (see ``postgres_root``); each test's server
logs are copied into its tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import psutil
import pytest

from bus.archive import ArchiveStore
from manager.embedded.postgres_binaries import PostgresBinaries
from manager.embedded.postgres_server import PostgresServer

_CHUNK = 64 * 1024


@pytest.fixture(scope="session")
def postgres_root() -> Iterator[Path]:
    """Where the servers' data dirs go: a dir every user may traverse, in RAM if possible.

    Not under pytest's temp root: as root, PostgreSQL runs as another user, and pytest makes
    that root 0700 whenever a pytest process starts. /dev/shm because creating a file costs
    about 1 ms on some disks (this VM's ext4) and a cluster holds over 1000 files.
    """
    shm = Path("/dev/shm")
    fast = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    root = Path(tempfile.mkdtemp(prefix="multibot-pg-", dir=fast))
    try:
        root.chmod(0o711)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dir(postgres_root: Path, tmp_path: Path) -> Iterator[Path]:
    """A dir for this test's data dirs that the servers' OS user can reach.

    Removed after the test (servers are stopped by then); their logs are kept in tmp_path.
    """
    directory = Path(tempfile.mkdtemp(dir=postgres_root))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        for log in directory.glob("*/postgres.log"):
            shutil.copyfile(log, tmp_path / f"{log.parent.name}-postgres.log")
        for pid_file in directory.glob("*/pgdata/postmaster.pid"):
            _remove_shared_memory(pid_file)
        shutil.rmtree(directory, ignore_errors=True)


def _remove_shared_memory(pid_file: Path) -> None:
    """Remove the SysV segment a killed server left (its next start would have done that).

    postmaster.pid's line 7 is "<key> <shmid>"; a cleanly stopped server leaves no pid file.
    """
    lines = pid_file.read_text().splitlines()
    if len(lines) >= 7 and len(fields := lines[6].split()) == 2:
        with contextlib.suppress(OSError):  # no ipcrm here: leak the 56 bytes
            subprocess.run(["ipcrm", "-m", fields[1]], capture_output=True, check=False)


async def _start_stop(server: PostgresServer) -> None:
    async with server:
        pass


@pytest.fixture(scope="session")
def postgres_template(postgres_root: Path) -> Path:
    """A stopped cluster made once per session (initdb, then the multibot database)."""
    server = PostgresServer(postgres_root / "template")
    # In a thread of its own: a sync session fixture must not touch the tests' event loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _start_stop(server)).result()
    # Dynamic shared memory in pgdata/pg_dynshmem, not /dev/shm: what a killed server
    # leaves goes away with its data dir.
    with (server.pgdata / "postgresql.conf").open("a") as conf:
        conf.write("dynamic_shared_memory_type = mmap\n")
    return server.pgdata


def copy_cluster(template: Path, server: PostgresServer) -> None:
    """Give ``server`` a copy of the template cluster (start() hands it to its OS user)."""
    shutil.copytree(template, server.pgdata, symlinks=True, copy_function=_sparse_copy)


def _sparse_copy(source: str, target: str) -> None:
    """Copy a file leaving holes for zero blocks: most of a fresh WAL segment is zeros."""
    zeros = bytes(_CHUNK)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            if chunk == zeros[: len(chunk)]:
                writer.seek(len(chunk), os.SEEK_CUR)
            else:
                writer.write(chunk)
        writer.truncate()  # at the position reached: extends over a trailing hole
    shutil.copymode(source, target)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited; a zombie counts (pid 1 here may never reap orphans)."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return status == "zombie"  # psutil.STATUS_ZOMBIE


async def stop_and_check(server: PostgresServer) -> None:
    """Stop ``server`` and fail the test if the postmaster or a backend is still there."""
    pid = server.pid
    children = [] if pid is None else psutil.Process(pid).children(recursive=True)
    await server.stop()
    assert not server.running
    for process in children:
        assert gone(process.pid), f"postgres backend {process.pid} survived stop()"
    assert pid is None or gone(pid), f"postmaster {pid} survived stop()"


class PostgresFactory(Protocol):
    """Starts an extra private server; the options are ``PostgresServer``'s.

    ``template=True`` starts it on a copy of the session's cluster when that can work (no
    password, the template's major version); else it runs initdb.
    """

    async def __call__(
        self,
        *,
        data_dir: Path | None = None,
        binaries: PostgresBinaries | None = None,
        port: int | None = None,
        password: str | None = None,
        run_as: str | None = None,
        unix_socket: bool = False,
        template: bool = True,
    ) -> PostgresServer: ...


@pytest.fixture
async def postgres_factory(
    postgres_dir: Path, postgres_template: Path
) -> AsyncIterator[PostgresFactory]:
    """Start private servers in this test's tmp_path; all are stopped and checked at teardown."""
    template_major = (postgres_template / "PG_VERSION").read_text().strip()
    count = 0
    async with contextlib.AsyncExitStack() as cleanup:  # stops every server even if one fails

        async def start(
            *,
            data_dir: Path | None = None,
            binaries: PostgresBinaries | None = None,
            port: int | None = None,
            password: str | None = None,
            run_as: str | None = None,
            unix_socket: bool = False,
            template: bool = True,
        ) -> PostgresServer:
            nonlocal count
            count += 1
            server = PostgresServer(
                data_dir or postgres_dir / f"pg{count}",
                binaries=binaries,
                port=port,
                password=password,
                run_as=run_as,
                unix_socket=unix_socket,
            )
            same_major = binaries is None or str(binaries.version[0]) == template_major
            if template and password is None and same_major and not server.pgdata.exists():
                copy_cluster(postgres_template, server)
            cleanup.push_async_callback(stop_and_check, server)
            await server.start()
            return server

        yield start


@pytest.fixture
async def postgres_server(postgres_factory: PostgresFactory) -> PostgresServer:
    """A started private PostgreSQL in tmp_path, no password; the test may kill and restart it."""
    return await postgres_factory()


@pytest.fixture
async def store(postgres_server: PostgresServer) -> AsyncIterator[ArchiveStore]:
    """A migrated, empty archive store on the test's private PostgreSQL."""
    async with await ArchiveStore.connect(postgres_server.dsn) as archive:
        await archive.migrate()
        yield archive
