"""One coordinating manager per deployment, elected through a fenced lease.

Several managers (one per host, ``host`` in each config) may run one deployment: the
same Redis, PostgreSQL and config. Each supervises the bots placed on its host; the
deployment-wide duties (the fanout and the outbox relay, lag, the archiver, the trimmer
and the memory pressure watch, retention, the restore after a Redis loss) run on one of
them, the holder of the coordinator lease (``<ns>:lease:{coordinator}``, the same fenced
lease the bots' active/standby pairs use, its holder the host's name).

Every manager tries for the lease each ``ttl / 3``. The holder renews it; one that cannot
(Redis away, or it was paused past the TTL and another took it) stops its duties at once.
When the holder dies, its lease lapses and another manager takes it within ``ttl`` plus a
round, starts the duties, and announces ``multibot.failover.triggered`` with ``role:
coordinator``. The duties are built to be run again by another process: the archiver
resumes from its group's pending entries, the fanout and the relay from the streams'.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis

from bus import EventType
from bus.keys import Keys
from bus.lease import Lease, parse_holder
from manager.announcer import Announcer
from manager.daemon.tasks import cancel_all

log = structlog.get_logger("manager")

#: The lease's owner name in :meth:`~bus.keys.Keys.partition_lease`'s family: its key.
COORDINATOR = "coordinator"

#: Starts the duties (told whether this is a takeover from another manager); returns their
#: tasks (cancelled when the lease is lost).
StartDuties = Callable[[bool], Sequence[asyncio.Task[Any]]]


def coordinator_lease_key(keys: Keys) -> str:
    """The coordinator lease (``<host> <token>``, with a TTL)."""
    return keys.lease(COORDINATOR)


class Leadership:
    """Runs the deployment's duties while this manager holds the coordinator lease."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        host: str,
        ttl: float,
        *,
        start: StartDuties,
        announcer: Announcer,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.host = host
        self._ttl = ttl
        self._start = start
        self._announcer = announcer
        self._lease = Lease(redis, keys, COORDINATOR, host, ttl, key=coordinator_lease_key(keys))
        self._duties: list[asyncio.Task[Any]] = []
        #: Who held the lease when last looked (None: nobody, or not looked yet).
        self.holder: str | None = None
        #: When this manager last took the lease (monotonic), for status.
        self.since: float | None = None
        #: The last holder seen (kept when the lease is found free): whether taking it is
        #: a takeover. The lease can lapse between a failed try and the look at who holds
        #: it; ``holder`` is then None, and the takeover must still be announced.
        self._last_seen: str | None = None

    def __repr__(self) -> str:
        return f"<Leadership {self.host} leading={self.leading} holder={self.holder}>"

    @property
    def duties(self) -> list[asyncio.Task[Any]]:
        """The duties' tasks while leading (empty otherwise)."""
        return list(self._duties)

    @property
    def leading(self) -> bool:
        """Whether this manager holds the lease now (by its own clock)."""
        return bool(self._duties) and self._lease.held

    async def settle(self) -> None:
        """One round now: take the lease if it is free (at start, so the first checks
        already know whether this manager coordinates)."""
        try:
            await self._round()
        except Exception as exc:
            log.warning("cannot check the coordinator lease", error=str(exc))

    async def run(self) -> None:
        """Try, renew, lead, until cancelled; then stop the duties and release."""
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._round()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("cannot check the coordinator lease", error=str(exc))
                    if self._duties and not self._lease.held:
                        await self._step_down("its lease ran out while Redis was away")
                await asyncio.sleep(max(0.05, self._ttl / 3 - (time.monotonic() - started)))
        finally:
            await self._step_down("the manager is stopping", release=True)

    async def _round(self) -> None:
        if self._duties:
            if await self._lease.renew():
                return
            # Not ours in Redis any more. Still ours by our own clock, and free (Redis lost
            # the key: restarted empty, say): nobody else can have coordinated meanwhile,
            # so take it again and go on, the duties undisturbed (a restore under way).
            valid = self._lease.held_until_now()
            if valid and await self._lease.try_acquire():
                log.warning("coordinator lease lost by Redis: taken again", host=self.host)
                return
            await self._step_down("another manager holds the coordinator lease now")
        if await self._lease.try_acquire():
            self._lead(self._last_seen)
        else:
            value: Any = await self._redis.get(coordinator_lease_key(self._keys))
            found = parse_holder(value.decode() if isinstance(value, bytes) else value)
            self.holder = found[0] if found else None
            self._last_seen = self.holder or self._last_seen

    def _lead(self, before: str | None) -> None:
        self.holder, self.since = self.host, time.monotonic()
        self._last_seen = self.host
        took_over = before is not None and before != self.host
        self._duties = list(self._start(took_over))
        log.info("coordinating the deployment", host=self.host, token=self._lease.token)
        if took_over:
            log.warning("failover: this manager took over the coordinator duties",
                        old_host=before, new_host=self.host)  # fmt: skip
            self._announcer.announce(
                EventType.FAILOVER_TRIGGERED,
                {
                    "bot_id": COORDINATOR,
                    "role": COORDINATOR,
                    "old_instance": before,
                    "new_instance": self.host,
                    "fencing_token": self._lease.token,
                    "reason": "the coordinating manager stopped renewing its lease",
                    "published_by": "manager",
                },
            )

    async def _step_down(self, why: str, *, release: bool = False) -> None:
        if self._duties:
            log.warning("no longer coordinating: duties stopped", host=self.host, reason=why)
            await cancel_all(self._duties)  # listed until they ended: see duties
            self._duties = []
            self.since = None
        if release:
            with contextlib.suppress(Exception):
                await self._lease.release()
