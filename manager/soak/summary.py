"""From a run's evidence to its report: collect, reconcile, count per fault, memory."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from bus.wire import entry_event_id
from manager.soak.bot import TICK
from manager.soak.collect import (
    LOAD_SUFFIX,
    read_archived,
    read_confirmed,
    read_dead_letters,
    read_handled,
)
from manager.soak.hostile import HostileEntry
from manager.soak.observe import MemorySampler
from manager.soak.process import ManagerKeeper
from manager.soak.reconcile import (
    SAMPLE,
    Catchup,
    DeadLetterRow,
    GroupResult,
    Handling,
    Kill,
    RedisKill,
    Window,
    per_fault,
    reconcile_archive,
    reconcile_group,
)
from manager.soak.report import FaultReport, GroupReport, HostileReport, MemoryReport, SoakReport
from manager.soak.setup import soak_groups


@dataclass
class Evidence:
    """What a run leaves behind for the reconciliation."""

    started: float
    ended: float
    work: Path
    redis: Redis
    dsn: str | None
    dlq: str
    windows: list[Window]
    kills: list[Kill]
    redis_kills: list[RedisKill]
    hangs: list[str]
    hostile: list[HostileEntry]
    sampler: MemorySampler
    keeper: ManagerKeeper
    backlog: dict[str, int]
    fault_errors: list[str]


def _load_summaries(load_dir: Path) -> dict[str, Any]:
    total: dict[str, Any] = {"attempted": 0, "confirmed": 0, "refused": Counter(), "rates": []}
    for path in sorted(load_dir.glob("*.json")):
        one = orjson.loads(path.read_bytes())
        total["attempted"] += one["attempted"]
        total["refused"].update(one["refused"])
        total["rates"].append(one["achieved_rate"])
    return total


async def summarize(duration: float, rate: float, ev: Evidence) -> SoakReport:
    """Collect what every party did and reconcile it (see :mod:`manager.soak.reconcile`)."""
    confirmed = read_confirmed(sorted((ev.work / "load").glob(f"*{LOAD_SUFFIX}")))
    handled = read_handled(ev.work / "handled")
    dead = await read_dead_letters(ev.redis, ev.dlq, ev.dsn)
    archived = await read_archived(ev.dsn, [TICK]) if ev.dsn else {}
    groups = [
        reconcile_group(
            g,
            confirmed,
            handled.get(g, []),
            dead,
            kills=ev.kills,
            windows=ev.windows,
            redis_kills=ev.redis_kills,
        )
        for g in soak_groups()
    ]
    archive = reconcile_archive(confirmed, archived, dead, ev.redis_kills)
    catchups = [Catchup(confirmed, g.first_handled) for g in groups]
    catchups.append(Catchup(confirmed, archived))
    faults = per_fault(ev.windows, confirmed, groups, archive, catchups)
    load = _load_summaries(ev.work / "load")
    lost_ids = {i for g in groups for i in g.lost} | set(archive.lost)
    with_aof = sorted({i for g in groups for i in g.lost_with_aof} | set(archive.lost_with_aof))
    ticks = set(confirmed)
    return SoakReport(
        duration_s=duration,
        rate_target=rate,
        achieved_rate=round(sum(load["rates"]), 1),
        attempted=load["attempted"],
        confirmed=len(confirmed),
        refused=dict(load["refused"]),
        handled={g.group: g.handled for g in groups},
        dead_lettered_by_reason=dict(Counter(d.reason for d in dead if d.event_id in ticks)),
        archived=archive.archived,
        lost=len(lost_ids),
        lost_with_aof=len(with_aof),
        lost_with_aof_sample=with_aof[:SAMPLE],
        redis_kills_aof_held=sum(1 for k in ev.redis_kills if k.aof_held),
        lost_archive=len(archive.lost),
        lost_archive_sample=archive.lost[:SAMPLE],
        duplicates={g.group: g.duplicates for g in groups},
        unarchivable=archive.unarchivable,
        groups={g.group: _group_report(g) for g in groups},
        soak_manager_kills=len(ev.keeper.kills),
        unexpected_manager_exits=len(ev.keeper.unexpected_exits),
        manager_exit_codes=[code for _, code in ev.keeper.unexpected_exits],
        redis_memory=_memory(ev),
        faults=[
            FaultReport(
                fault=f.fault,
                injections=f.injections,
                confirmed=f.confirmed,
                lost=f.lost,
                lost_with_aof=f.lost_with_aof,
                duplicates=f.duplicates,
                recovery_s=f.recovery,
                redis_peak_bytes=_peak_in(
                    ev.sampler, [w for w in ev.windows if w.fault == f.fault]
                ),
            )
            for f in faults
        ],
        hung_handler=_hangs(ev.hangs, dead),
        hostile=[_hostile(h, dead, handled, archived) for h in ev.hostile],
        caught_up=not any(ev.backlog.values()),
        backlog_left={k: v for k, v in ev.backlog.items() if v},
        fault_errors=ev.fault_errors,
        work_dir=None,
    )


def _group_report(g: GroupResult) -> GroupReport:
    return GroupReport(
        handled=g.handled,
        dead_lettered=g.dead_lettered,
        lost=len(g.lost),
        lost_sample=g.lost[:SAMPLE],
        lost_with_aof=len(g.lost_with_aof),
        duplicates=g.duplicates,
        duplicates_by_cause=g.duplicates_by_cause,
        unexplained_duplicates=g.duplicates_by_cause.get("unexplained", 0),
        unexplained_sample=g.unexplained_sample,
        unconfirmed_handled=g.unconfirmed_handled,
    )


def _memory(ev: Evidence) -> MemoryReport:
    samples = ev.sampler.samples
    limit = ev.sampler.configured_maxmemory()
    overridden = ev.sampler.overrides
    peak = max(samples, key=lambda s: s.used, default=None)

    def in_override(at: float) -> int | None:
        return next((low for start, end, low in overridden if start <= at <= end), None)

    over = sum(1 for s in samples if in_override(s.at) is None and limit and s.used > limit)
    over_fault = sum(1 for s in samples if (low := in_override(s.at)) is not None and s.used > low)
    return MemoryReport(
        peak_bytes=peak.used if peak else 0,
        peak_at_s=round(peak.at - ev.started, 1) if peak else None,
        maxmemory_bytes=limit,
        samples=len(samples),
        over_maxmemory_samples=over,
        over_fault_limit_samples=over_fault,
    )


def _peak_in(sampler: MemorySampler, windows: list[Window], after: float = 10.0) -> int | None:
    used = [s.used for s in sampler.samples for w in windows if w.start <= s.at <= w.end + after]
    return max(used) if used else None


def _hangs(hangs: list[str], dead: list[DeadLetterRow]) -> dict[str, int]:
    if not hangs:
        return {}
    ids = set(hangs)
    out = {"published": len(hangs)}
    for group in soak_groups():
        out[f"{group} timeout"] = sum(
            1 for d in dead if d.event_id in ids and d.group == group and d.reason == "timeout"
        )
    return out


def _hostile(
    entry: HostileEntry,
    dead: list[DeadLetterRow],
    handled: dict[str, list[Handling]],
    archived: dict[str, float],
) -> HostileReport:
    event_id = entry_event_id(entry.stream, entry.entry_id)  # it carried no id
    by = sorted(g for g, rows in handled.items() if any(h.event_id == event_id for h in rows))
    letters = [
        f"{d.group}: {d.reason}"
        for d in dead
        if d.entry_id == entry.entry_id and d.stream in (entry.stream, "")
    ]
    return HostileReport(
        kind=entry.kind,
        stream=entry.stream,
        entry_id=entry.entry_id,
        dead_letters=sorted(letters),
        handled_by=by,
        archived=event_id in archived,
    )
