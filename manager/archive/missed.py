"""Events that missed a consumer group: no final outcome ``audit.missed_after`` seconds on.

The coordinating manager's :class:`MissedDeliveries` checks, every ``interval`` seconds, the
archived events created between the point it has checked up to and ``missed_after`` seconds
ago: per group, those the group should have received (it declared a matching subscription
when the event was created) and has no final outcome for, handled, dead-lettered or skipped
(:meth:`bus.archive.deliveries.Deliveries.missed`). Each count is added to the group's
counter, ``multibot_deliveries_missed_total``, and logged with what to run.

Each window of events is counted once: the point moves on only after a check that worked,
and only once the archive holds the window's events and their delivery records
(``caught_up``: an archiver or a copy running behind would make handled events look
missed, or keep missed ones from being counted).
PostgreSQL away holds the window (logged once per outage). When it is back, the archiver and
the delivery records' copier have what waited in Redis to write, so the watch gives them the
same deadline again before it goes on; a window holds at most ``most`` seconds of events, so
a long outage is caught up in steps.

The counters live in this process. A coordinator starts (or takes over) at ``missed_after``
seconds ago and does not rescan the archive: the events between the previous coordinator's
last check and that point are not counted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog

from bus.archive.errors import ArchiveUnavailableError
from bus.archive.store import ArchiveStore
from bus.periodic import Outage, every

log = structlog.get_logger("manager.archive.missed")

#: Seconds of events one round checks at most (a long outage is caught up in steps).
MOST = 3600.0
_ARCHIVE_AWAY = Outage((ArchiveUnavailableError,), "PostgreSQL unavailable")


class MissedDeliveries:
    """Counts, per group, the events that missed it past the deadline; :meth:`run` until
    cancelled (the coordinating manager's duty), :meth:`totals` for the metrics."""

    def __init__(
        self,
        store: Callable[[], Awaitable[ArchiveStore]],
        missed_after: float,
        *,
        interval: float = 30.0,
        most: float = MOST,
        caught_up: Callable[[datetime, datetime], Awaitable[str]] | None = None,
    ) -> None:
        """``caught_up(until, now)``: "" once the archive has what a window up to
        ``until`` needs, else what it waits for (None: never waits)."""
        self._store = store
        self._caught_up = caught_up
        self._waiting_for = ""
        self._after = timedelta(seconds=missed_after)
        self._most = timedelta(seconds=most)
        self.interval = interval
        self._totals: dict[str, int] = {}
        #: Events created before it are counted; None until the first round of a run.
        self.checked: datetime | None = None
        #: After an outage: no window is checked before this time.
        self._held_until: datetime | None = None
        self._away = False

    def __repr__(self) -> str:
        checked = self.checked.isoformat() if self.checked else None
        return (
            f"<MissedDeliveries checked={checked} groups={len(self._totals)} "
            f"missed={sum(self._totals.values())}>"
        )

    def totals(self) -> dict[str, int]:
        """Events counted as missed since this manager started, per group (a copy)."""
        return dict(self._totals)

    async def run(self) -> None:
        """Check a window every ``interval`` until cancelled, from ``missed_after`` ago."""
        self.checked, self._held_until, self._away = None, None, False
        await every(
            self.interval,
            self.check,
            log=log,
            what="count the events that missed a group",
            outages=(_ARCHIVE_AWAY,),
            resumed="can count the events that missed a group again",
        )

    async def check(self) -> dict[str, int]:
        """One round: the next window's missed events, added to the totals; this round's
        counts. Raises ArchiveUnavailableError while PostgreSQL is away (nothing counted)."""
        now = datetime.now(UTC)
        if self.checked is None:
            self.checked = now - self._after
        since = self.checked
        until = min(now - self._after, since + self._most)
        if until <= since or (self._held_until is not None and now < self._held_until):
            return {}
        if self._caught_up is not None and await self._behind(until, now):
            return {}
        try:
            missed = await (await self._store()).deliveries.missed(since, until)
        except ArchiveUnavailableError:
            self._away = True
            raise
        if self._away:  # back: what waited in Redis is written before this window counts
            self._away = False
            self._held_until = now + self._after
            return {}
        self.checked = until
        for group, count in sorted(missed.items()):
            self._totals[group] = self._totals.get(group, 0) + count
            log.warning(
                "events missed a group: no outcome past the deadline",
                group=group,
                events=count,
                created_from=since.isoformat(),
                created_until=until.isoformat(),
                missed_after=self._after.total_seconds(),
                see=f"multibot events query --since {_second(since)} --until "
                f"{_second(until + timedelta(seconds=1))}, then multibot events show ID "
                "(the group shows as expected, not handled)",
            )
        return missed

    async def _behind(self, until: datetime, now: datetime) -> bool:
        """Whether the archive is still behind the window (logged when that starts)."""
        assert self._caught_up is not None
        waiting = await self._caught_up(until, now)
        if waiting and waiting != self._waiting_for:
            log.info("missed events not counted until the archive catches up", waiting_for=waiting)
        self._waiting_for = waiting
        return bool(waiting)


def _second(moment: datetime) -> str:
    """The moment as the CLI's ``--since``/``--until`` take it, to the second (UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
