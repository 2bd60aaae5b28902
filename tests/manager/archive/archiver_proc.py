"""The manager's archiver in its own process, for tests that SIGKILL it mid-batch.

Run as ``python -m tests.manager.archive.archiver_proc REDIS_URL DSN [BATCH_SIZE [CONSUMER
CLAIM_IDLE]]``. It archives the default namespace with the default :class:`ArchiveSettings`
(but ``BATCH_SIZE``; with ``CONSUMER``, as one of several archivers, taking over what
another left unacked for ``CLAIM_IDLE`` seconds), through an
:class:`ArchiveLink` as the daemon does, and writes ``ready`` on stdout once Redis and
PostgreSQL answered and the archiver runs. SIGTERM stops it cleanly (exit code 0); SIGKILL
is the crash the tests are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

from bus.connection import connect
from bus.keys import Keys
from bus.settings import BusSettings
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.config import ArchiveSettings


async def _archive(redis_url: str, dsn: str, batch_size: int, consumer: list[str]) -> None:
    keys = Keys()
    redis = connect(BusSettings(redis_url=redis_url), client_name="archiver-proc")
    link = ArchiveLink(dsn, keys)
    settings = ArchiveSettings(batch_size=batch_size, fill_wait=0.05)
    named: dict[str, Any] = {}
    if consumer:
        settings = ArchiveSettings(
            batch_size=batch_size, claim_idle=float(consumer[1]), fill_wait=0.05
        )
        named = {"consumer": consumer[0], "leave_on_stop": True}
    archiver = Archiver(redis, keys, settings, link.get, **named)
    try:
        await redis.ping()
        await link.get()  # connects and migrates, as the daemon's try_at_start does
        task = asyncio.create_task(archiver.run())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await link.close()
        await redis.aclose()


def main(argv: list[str]) -> None:
    """Archive until SIGTERM (or SIGKILL)."""
    if len(argv) not in (2, 3, 5):
        sys.exit(
            "usage: python -m tests.manager.archive.archiver_proc REDIS_URL DSN "
            "[BATCH_SIZE [CONSUMER CLAIM_IDLE]]"
        )
    batch_size = int(argv[2]) if len(argv) >= 3 else ArchiveSettings().batch_size
    asyncio.run(_archive(argv[0], argv[1], batch_size, argv[3:]))


if __name__ == "__main__":
    main(sys.argv[1:])
