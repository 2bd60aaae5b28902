"""Retention of the archive: daily partitions made ahead of time, old ones dropped whole.

At start and then every hour: the partitions of today and ``partitions_ahead`` days are
created (the archiver also creates a missing day on demand), and every partition of a day
older than ``retention_days`` is dropped in one statement each, never row by row: the
events' partitions and their deliveries' (partitioned by the event's day), with the
subscription history that ended before any event kept. The operator actions older than
``audit.retention_days`` are deleted (few rows: no partitions).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import structlog

from bus.archive.errors import ArchiveUnavailableError
from bus.archive.store import ArchiveStore
from bus.periodic import Outage, every
from manager.config import ArchiveSettings

log = structlog.get_logger("manager.archive.retention")
INTERVAL = 3600.0  # seconds between rounds
RETRY = 60.0  # seconds before trying a failed round again


def cutoff_day(today: date, retention_days: int) -> date:
    """The oldest day kept: partitions of days before it are dropped."""
    return today - timedelta(days=retention_days)


async def maintain(
    store: ArchiveStore, settings: ArchiveSettings, today: date, audit_days: int | None = None
) -> list[str]:
    """One round; the partitions dropped."""
    if audit_days is not None:
        cutoff = datetime.combine(cutoff_day(today, audit_days), datetime.min.time(), UTC)
        if deleted := await store.audit.delete_before(cutoff):
            log.info("old operator actions deleted", rows=deleted, retention_days=audit_days)
    await store.create_partitions_ahead(today, settings.partitions_ahead)
    oldest = cutoff_day(today, settings.retention_days)
    dropped = await store.drop_partitions_before(oldest)
    await store.deliveries.forget_history_before(oldest)
    if dropped:
        log.info(
            "old partitions dropped", partitions=dropped, retention_days=settings.retention_days
        )
    return dropped


async def run_retention(
    store: Callable[[], Awaitable[ArchiveStore]],
    settings: ArchiveSettings,
    audit_days: int | None = None,
) -> None:
    """Maintain the partitions (and the audit log's age, with ``audit_days``) every hour
    until cancelled; a failed round is tried again after a minute."""

    async def step() -> None:
        await maintain(await store(), settings, datetime.now(UTC).date(), audit_days)

    await every(
        INTERVAL,
        step,
        log=log,
        what="maintain partitions",
        outages=(Outage((ArchiveUnavailableError,), "PostgreSQL unavailable"),),
        retry=RETRY,
    )
