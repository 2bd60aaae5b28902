"""Archivers in processes of their own, for tests that SIGKILL them mid-batch, and a steady
load to archive meanwhile (see ``archiver_proc.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis

from bus import BusClient
from bus.keys import ARCHIVER_GROUP
from manager.embedded.postgres_server import PostgresServer
from tests.manager.archive.archive_support import archiver_groups, backlog, publish
from tests.support import ChildProc, wait_until

REPO = Path(__file__).resolve().parents[3]


class ArchiverProc(ChildProc):
    """An archiver process started by :func:`archiver_procs`."""

    name = "archiver"

    async def wait_ready(self) -> None:
        """Wait until it wrote ``ready`` (connected and archiving)."""

        def ready() -> bool:
            self.check_alive()
            return "ready" in self.out.read_text().split()

        await wait_until(ready, timeout=15, what="archiver process ready")

    async def kill_mid_batch(self, redis: Redis, consumer: str | None = None) -> int:
        """SIGKILL it while it holds a batch read but not acked; the entries it held.
        With ``consumer`` (one of several archivers), what that consumer holds.

        It is frozen (SIGSTOP) while the batch is looked for, so the batch cannot be acked
        between the look and the kill."""

        async def held() -> int:
            return await held_by(redis, consumer) if consumer else (await backlog(redis))[0]

        entries = 0

        async def holding() -> bool:
            nonlocal entries
            entries = await held()
            return entries > 0

        await self.kill_while(holding, f"{consumer or 'the archiver'} holding a batch")
        return entries

    async def terminate(self) -> int:
        """SIGTERM it; its exit code once it stopped."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 15)


class ArchiverProcs(Protocol):
    """Starts an archiver process on the test's Redis and PostgreSQL; returns once ready."""

    async def __call__(
        self, batch_size: int = ..., consumer: str | None = ..., claim_idle: float = ...
    ) -> ArchiverProc: ...


@pytest.fixture
async def archiver_procs(
    redis_url: str, postgres_server: PostgresServer, tmp_path: Path
) -> AsyncIterator[ArchiverProcs]:
    """Start archiver processes; every one still alive is SIGKILLed at teardown."""
    procs: list[ArchiverProc] = []

    async def start(
        batch_size: int = 50, consumer: str | None = None, claim_idle: float = 1.0
    ) -> ArchiverProc:
        out, log = tmp_path / f"archiver-{len(procs)}.out", tmp_path / f"archiver-{len(procs)}.log"
        args = [redis_url, postgres_server.dsn, str(batch_size)]
        if consumer is not None:  # one of several archivers
            args += [consumer, str(claim_idle)]
        with out.open("wb") as out_file, log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.manager.archive.archiver_proc", *args,
                cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=out_file, stderr=log_file,
            )  # fmt: skip
        proc = ArchiverProc(process, out, log)
        procs.append(proc)
        await proc.wait_ready()
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            await proc.kill()


@contextlib.asynccontextmanager
async def producing(bus: BusClient, published: list[str]) -> AsyncIterator[None]:
    """Publish batches of events in the background while the block runs; the ids Redis
    confirmed are appended to ``published``."""
    stop = asyncio.Event()

    async def produce() -> None:
        while not stop.is_set():
            events = await publish(bus, 15, start=len(published))
            published.extend(e.id for e in events)
            await asyncio.sleep(0.01)  # a steady load rather than a flood

    task = asyncio.create_task(produce())
    try:
        yield
    finally:
        stop.set()
        await task


async def held_by(redis: Redis, consumer: str) -> int:
    """Entries ``consumer`` has read and not acked, over the archiver group's streams."""
    held = 0
    for stream, _ in await archiver_groups(redis):
        summary: Any = await redis.xpending(stream, ARCHIVER_GROUP)
        names = (consumer, consumer.encode())
        held += sum(int(c["pending"]) for c in summary["consumers"] if c["name"] in names)
    return held


async def holds_a_batch(redis: Redis) -> bool:
    """Whether the archiver group has entries read but not acked (a batch in flight)."""
    return (await backlog(redis))[0] > 0
