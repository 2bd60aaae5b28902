"""The soak's report: one typed document, printed as a table or as JSON."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, Field

from manager.observe.memory import format_size


class GroupReport(BaseModel):
    """One group's reconciliation."""

    handled: int
    dead_lettered: dict[str, int]
    lost: int
    lost_sample: list[str]
    #: Gone with Redis's AOF at a redis-kill (not in ``lost``): see ``SoakReport``.
    lost_with_aof: int
    duplicates: int
    duplicates_by_cause: dict[str, int]
    unexplained_duplicates: int
    unexplained_sample: list[str]
    #: Handled, though the publish raised (Redis had written it): not counted as confirmed.
    unconfirmed_handled: int


class FaultReport(BaseModel):
    """One fault class over its injections."""

    fault: str
    injections: int
    confirmed: int
    lost: int
    lost_with_aof: int
    duplicates: int
    recovery_s: list[float]
    redis_peak_bytes: int | None


class MemoryReport(BaseModel):
    """Redis memory through the run (sampled: ``INFO``'s own peak resets at each restart)."""

    peak_bytes: int
    peak_at_s: float | None = Field(description="seconds into the run")
    maxmemory_bytes: int = Field(description="0: unlimited")
    samples: int
    #: Samples above the configured maxmemory (outside the redis-oom fault's own limit).
    over_maxmemory_samples: int
    #: Samples above the redis-oom fault's low limit, while it held.
    over_fault_limit_samples: int


class HostileReport(BaseModel):
    """One hostile entry: the dead letters it became (``group: reason``), or the groups
    that handled it as an event (its id derived from the entry id) and whether it was
    archived."""

    kind: str
    stream: str
    entry_id: str
    dead_letters: list[str]
    handled_by: list[str]
    archived: bool


class SoakReport(BaseModel):
    """Everything ``multibot soak`` measured; ``lost`` and ``unexpected_manager_exits`` decide
    the exit code."""

    duration_s: float
    rate_target: float
    achieved_rate: float
    attempted: int
    confirmed: int
    refused: dict[str, int]
    handled: dict[str, int]
    dead_lettered_by_reason: dict[str, int]
    archived: int
    lost: int
    #: Confirmed events gone with the redis-server at a redis-kill that found it holding
    #: AOF writes back (``appendfsync everysec`` while an fsync ran: a slow disk), in the
    #: seconds before: what that policy allows; not in ``lost``.
    lost_with_aof: int
    lost_with_aof_sample: list[str]
    #: redis-kills that found Redis holding AOF writes back.
    redis_kills_aof_held: int
    lost_archive: int
    lost_archive_sample: list[str]
    duplicates: dict[str, int]
    unarchivable: int
    groups: dict[str, GroupReport]
    soak_manager_kills: int
    unexpected_manager_exits: int
    manager_exit_codes: list[int | None]
    redis_memory: MemoryReport
    faults: list[FaultReport]
    hung_handler: dict[str, int]
    hostile: list[HostileReport]
    caught_up: bool
    backlog_left: dict[str, int]
    fault_errors: list[str]
    work_dir: str | None

    @property
    def ok(self) -> bool:
        """No loss and no manager exit the soak did not cause."""
        return self.lost == 0 and self.unexpected_manager_exits == 0


def render(report: SoakReport, echo: Callable[[str], None]) -> None:
    """Print the report for a person."""
    mem = report.redis_memory
    limit = format_size(mem.maxmemory_bytes) if mem.maxmemory_bytes else "unlimited"
    echo(
        f"soak: {report.duration_s:g} s at {report.rate_target:g}/s target, "
        f"{report.achieved_rate:g}/s confirmed; caught up: {'yes' if report.caught_up else 'NO'}"
    )
    refused = ", ".join(f"{k} {v}" for k, v in sorted(report.refused.items())) or "none"
    echo(f"attempted {report.attempted}, confirmed {report.confirmed}, refused: {refused}")
    for group, g in sorted(report.groups.items()):
        dead = ", ".join(f"{k} {v}" for k, v in sorted(g.dead_lettered.items())) or "none"
        causes = ", ".join(f"{k} {v}" for k, v in sorted(g.duplicates_by_cause.items()))
        echo(
            f"  {group}: handled {g.handled}, dead-lettered {dead}, lost {g.lost}, "
            f"duplicates {g.duplicates}{f' ({causes})' if causes else ''}"
        )
    echo(
        f"archived {report.archived}, lost from the archive {report.lost_archive}, "
        f"unarchivable {report.unarchivable}"
    )
    echo(f"LOST: {report.lost}")
    if report.lost_with_aof:
        echo(
            f"gone with Redis's AOF: {report.lost_with_aof} confirmed events, in the seconds "
            f"before {report.redis_kills_aof_held} redis-kill(s) that found an AOF fsync still "
            "running (appendfsync everysec: Redis answers and writes its AOF once the fsync "
            'is done; redis_appendfsync = "always" loses none)'
        )
    echo(
        f"manager: {report.soak_manager_kills} kill -9 by the soak, "
        f"{report.unexpected_manager_exits} exits it did not cause"
    )
    echo(
        f"redis memory: peak {format_size(mem.peak_bytes)} vs maxmemory {limit}; "
        f"{mem.over_maxmemory_samples} of {mem.samples} samples over it"
    )
    echo("")
    header = (
        f"{'fault':<14}{'n':>3}{'confirmed':>11}{'lost':>6}{'dups':>6}  recovery s   redis peak"
    )
    echo(header)
    for f in report.faults:
        recovery = ",".join(f"{r:.1f}" for r in f.recovery_s)
        peak = format_size(f.redis_peak_bytes) if f.redis_peak_bytes is not None else "-"
        echo(
            f"{f.fault:<14}{f.injections:>3}{f.confirmed:>11}{f.lost:>6}{f.duplicates:>6}  "
            f"{recovery:<12} {peak}"
        )
    if report.hung_handler:
        echo("")
        echo("hung handler: " + ", ".join(f"{k} {v}" for k, v in report.hung_handler.items()))
    for h in report.hostile:
        fate = h.dead_letters + [f"{g}: handled" for g in h.handled_by]
        fate += ["archived"] if h.archived else []
        echo(f"hostile {h.kind} {h.entry_id}: {', '.join(fate) or 'nothing'}")
    for error in report.fault_errors:
        echo(f"fault error: {error}")
    if report.backlog_left and any(report.backlog_left.values()):
        echo(f"not caught up: {report.backlog_left}")
    if report.work_dir:
        echo(f"files kept in {report.work_dir}")
