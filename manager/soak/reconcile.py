"""Reconciling a run by event id: pure functions over what was confirmed, handled and stored.

Per group, an event Redis confirmed is *lost* when the group neither handled it nor
dead-lettered it; for the archive, when PostgreSQL has no row for it and the archiver did
not dead-letter it as ``unarchivable``. A lost event confirmed in the seconds before a
``redis-kill`` that found Redis holding its AOF writes back (``appendfsync everysec`` with a
background fsync still running: Redis answers, and writes the AOF once the fsync is done,
up to two seconds of its clock later) went with the server, not with the bus: it is counted
apart, as *lost with the AOF*. An event a group handled more than once is a
*duplicate*; it is *explained* when the process that handled it first was SIGKILLed by the
soak after that handling (a kill mid-flight: the handler ran, the ack never reached Redis),
and is put down to a Redis restart when the first handling fell in a ``redis-kill`` window
(an ack lost with the server); anything else is *unexplained*. Nothing here reads a clock,
a file or a server: the tests feed it ids.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bus.dlq import DeadLetterReason
from bus.keys import ARCHIVER_GROUP

#: Ids listed per category in a result (the counts are always complete).
SAMPLE = 20
#: Seconds a handling may precede its process's kill and still count as killed mid-flight
#: (the ack of a handled entry goes out within milliseconds; this is generous).
KILL_SPAN = 5.0
#: Seconds before a redis-kill whose confirmed writes Redis may still have held back from
#: its AOF: it postpones them while a background fsync runs, for under two seconds of its
#: clock (whole seconds: up to three of ours).
AOF_HOLD_S = 3.0


@dataclass(frozen=True, slots=True)
class Handling:
    """One handler run recorded by a soak bot: the event, the process, the wall time."""

    event_id: str
    pid: int
    at: float


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """What reconciliation needs of one dead letter."""

    event_id: str
    group: str
    reason: str
    stream: str = ""
    entry_id: str = ""


@dataclass(frozen=True, slots=True)
class Kill:
    """A process the soak SIGKILLed: its pid, when, and by which fault."""

    pid: int
    at: float
    fault: str


@dataclass(frozen=True, slots=True)
class RedisKill:
    """A redis-kill: when, and whether Redis was holding AOF writes back then (an fsync of
    its AOF still running under ``appendfsync everysec``)."""

    at: float
    aof_held: bool


def with_the_aof(
    lost: Sequence[str], confirmed: Mapping[str, float], kills: Sequence[RedisKill]
) -> tuple[list[str], list[str]]:
    """``lost`` split into those confirmed within :data:`AOF_HOLD_S` before a redis-kill
    that found AOF writes held back (gone with the server), and the rest."""
    held = [k.at for k in kills if k.aof_held]
    gone = [i for i in lost if any(at - AOF_HOLD_S <= confirmed[i] <= at for at in held)]
    taken = set(gone)
    return gone, [i for i in lost if i not in taken]


@dataclass(frozen=True, slots=True)
class Window:
    """One fault injection: its class, start and end (wall times)."""

    fault: str
    start: float
    end: float


@dataclass
class GroupResult:
    """One group's side of the reconciliation."""

    group: str
    handled: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    #: Lost with Redis's AOF at a redis-kill (see :func:`with_the_aof`), not in ``lost``.
    lost_with_aof: list[str] = field(default_factory=list)
    duplicates: int = 0
    #: Duplicates by explanation: a fault class (``bot-kill``, ``manager-kill``,
    #: ``redis-kill``) or ``unexplained``.
    duplicates_by_cause: dict[str, int] = field(default_factory=dict)
    unexplained_sample: list[str] = field(default_factory=list)
    #: Handled events that no load process saw confirmed (their publish raised after Redis
    #: had written them): not lost, not counted as confirmed.
    unconfirmed_handled: int = 0
    #: First handling time of each event (for recovery times).
    first_handled: dict[str, float] = field(default_factory=dict, repr=False)
    #: Event id → the cause of its duplicate.
    duplicate_causes: dict[str, str] = field(default_factory=dict, repr=False)


def reconcile_group(
    group: str,
    confirmed: Mapping[str, float],
    handlings: Sequence[Handling],
    dead: Sequence[DeadLetterRow],
    *,
    kills: Sequence[Kill] = (),
    windows: Sequence[Window] = (),
    redis_kills: Sequence[RedisKill] = (),
) -> GroupResult:
    """Compare what ``group`` handled and dead-lettered with the ``confirmed`` events."""
    result = GroupResult(group)
    counts: Counter[str] = Counter()
    first: dict[str, Handling] = {}
    for h in sorted(handlings, key=lambda h: h.at):
        counts[h.event_id] += 1
        first.setdefault(h.event_id, h)
    result.first_handled = {i: h.at for i, h in first.items()}
    mine = [d for d in dead if d.group == group]
    result.dead_lettered = dict(Counter(d.reason for d in mine))
    dead_ids = {d.event_id for d in mine}
    result.handled = sum(1 for i in counts if i in confirmed)
    result.unconfirmed_handled = sum(1 for i in counts if i not in confirmed)
    lost = sorted(i for i in confirmed if i not in counts and i not in dead_ids)
    result.lost_with_aof, result.lost = with_the_aof(lost, confirmed, redis_kills)
    killed = {k.pid: k for k in kills}
    redis_windows = [w for w in windows if w.fault == "redis-kill"]
    causes: Counter[str] = Counter()
    for event_id, n in counts.items():
        if n < 2:
            continue
        cause = _duplicate_cause(first[event_id], killed, redis_windows)
        result.duplicate_causes[event_id] = cause
        causes[cause] += 1
        if cause == "unexplained" and len(result.unexplained_sample) < SAMPLE:
            result.unexplained_sample.append(event_id)
    result.duplicates = sum(causes.values())
    result.duplicates_by_cause = dict(causes)
    return result


def _duplicate_cause(first: Handling, killed: Mapping[int, Kill], redis: Sequence[Window]) -> str:
    kill = killed.get(first.pid)
    if kill is not None and 0.0 <= kill.at - first.at <= KILL_SPAN:
        return kill.fault
    if any(w.start - 1.0 <= first.at <= w.end + 10.0 for w in redis):
        return "redis-kill"
    return "unexplained"


@dataclass
class ArchiveResult:
    """The archive's side: stored, lost, set aside as unarchivable."""

    archived: int = 0
    lost: list[str] = field(default_factory=list)
    #: Lost with Redis's AOF at a redis-kill (see :func:`with_the_aof`), not in ``lost``.
    lost_with_aof: list[str] = field(default_factory=list)
    unarchivable: int = 0


def reconcile_archive(
    confirmed: Mapping[str, float],
    archived: Mapping[str, float],
    dead: Sequence[DeadLetterRow],
    redis_kills: Sequence[RedisKill] = (),
) -> ArchiveResult:
    """Compare the ``archived`` ids with the ``confirmed`` ones."""
    unarchivable = {
        d.event_id
        for d in dead
        if d.group == ARCHIVER_GROUP or d.reason == DeadLetterReason.UNARCHIVABLE
    }
    lost = sorted(i for i in confirmed if i not in archived and i not in unarchivable)
    with_aof, lost = with_the_aof(lost, confirmed, redis_kills)
    return ArchiveResult(
        archived=sum(1 for i in confirmed if i in archived),
        lost=lost,
        lost_with_aof=with_aof,
        unarchivable=sum(1 for i in confirmed if i in unarchivable),
    )


@dataclass
class FaultResult:
    """One fault class over all its injections."""

    fault: str
    injections: int = 0
    confirmed: int = 0
    lost: int = 0
    #: Lost with Redis's AOF (see :func:`with_the_aof`), apart from ``lost``.
    lost_with_aof: int = 0
    duplicates: int = 0
    #: Seconds from each injection's end until publishing and every group and the archive
    #: had caught up with what was confirmed before it.
    recovery: list[float] = field(default_factory=list)


class Catchup:
    """When everything confirmed up to a time had been handled (or stored) by one party."""

    def __init__(self, confirmed: Mapping[str, float], done: Mapping[str, float]) -> None:
        pairs = sorted((t, done[i]) for i, t in confirmed.items() if i in done)
        self._times = [t for t, _ in pairs]
        self._done: list[float] = []
        latest = 0.0
        for _, d in pairs:
            latest = max(latest, d)
            self._done.append(latest)

    def __repr__(self) -> str:
        return f"<Catchup events={len(self._times)}>"

    def at(self, moment: float) -> float | None:
        """When the last event confirmed at or before ``moment`` was done; None if none."""
        index = bisect.bisect_right(self._times, moment)
        return self._done[index - 1] if index else None


def recovery_time(end: float, confirm_times: Sequence[float], catchups: Sequence[Catchup]) -> float:
    """Seconds from ``end`` until a publish was confirmed again (``confirm_times`` sorted) and
    each party had done everything confirmed up to ``end``; 0 when nothing lagged."""
    index = bisect.bisect_left(confirm_times, end)
    moments = [confirm_times[index]] if index < len(confirm_times) else []
    moments += [t for c in catchups if (t := c.at(end)) is not None]
    return max(0.0, max(moments, default=end) - end)


def per_fault(
    windows: Sequence[Window],
    confirmed: Mapping[str, float],
    groups: Sequence[GroupResult],
    archive: ArchiveResult,
    catchups: Sequence[Catchup],
    *,
    grace: float = 10.0,
) -> list[FaultResult]:
    """Per fault class: confirmed from each window's start until it recovered, lost
    (confirmed from a window's start to ``grace`` seconds after its end), duplicates first
    handled in that span, recovery times."""
    confirm_times = sorted(confirmed.values())
    lost_at = [confirmed[i] for g in groups for i in g.lost] + [confirmed[i] for i in archive.lost]
    aof_at = [confirmed[i] for g in groups for i in g.lost_with_aof]
    aof_at += [confirmed[i] for i in archive.lost_with_aof]
    dup_at = [g.first_handled[i] for g in groups for i in g.duplicate_causes]
    results: dict[str, FaultResult] = defaultdict(lambda: FaultResult(""))
    for w in windows:
        r = results[w.fault]
        r.fault = w.fault
        r.injections += 1
        recovery = recovery_time(w.end, confirm_times, catchups)
        r.confirmed += _count_in(confirm_times, w.start, w.end + recovery)
        r.lost += sum(1 for t in lost_at if w.start <= t <= w.end + grace)
        r.lost_with_aof += sum(1 for t in aof_at if w.start - AOF_HOLD_S <= t <= w.end)
        r.duplicates += sum(1 for t in dup_at if w.start <= t <= w.end + grace)
        r.recovery.append(round(recovery, 3))
    return sorted(results.values(), key=lambda r: r.fault)


def _count_in(sorted_times: Sequence[float], start: float, end: float) -> int:
    return bisect.bisect_right(sorted_times, end) - bisect.bisect_left(sorted_times, start)
