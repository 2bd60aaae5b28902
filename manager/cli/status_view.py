"""`multibot status` for a person: the manager's status document as a header and two tables.

Colour only on a terminal: failed and hung instances in red, backoff and stale heartbeats in
yellow, the budget line yellow/red as it fills. In a pipe or a file the output is plain text
(no escape codes) with one instance per line and the bot id on every line, so grep works.
Every cell is a ``rich.text.Text``, never markup, so a bot id or an exit message containing
``[brackets]`` is shown as written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bus.connection import redact
from manager.observe.memory import format_size
from manager.status import (
    TROUBLE_STATES,
    ArchiveStatus,
    BotStatus,
    DeploymentStatus,
    GroupStatus,
    InstanceState,
    ManagerInfo,
    ManagerStatus,
    MemoryStatus,
    RedisMemoryStatus,
)

#: A heartbeat older than this many seconds is shown as stale (yellow).
STALE_HEARTBEAT = 30.0

MISSING = "-"
_YELLOW_STATES = frozenset({InstanceState.BACKOFF})


def render_status(
    status: ManagerStatus, console: Console, *, stale_after: float = STALE_HEARTBEAT
) -> None:
    """Print the status document (the manager's ``status`` answer) on ``console``.

    ``stale_after`` is the heartbeat age, in seconds, from which it is shown as stale.
    Values that are None print as "-"; an empty fleet prints "none" under its heading.
    """
    view = _View(colour=console.is_terminal)
    console.print(view.header(status.manager))
    if status.deployment and len(status.deployment.hosts) > 1:
        console.print(view.deployment(status.deployment))
    console.print(view.memory(status.memory))
    if status.redis_memory:
        console.print(view.redis_memory(status.redis_memory))
    if status.archive:
        console.print(view.archive(status.archive))
    console.print()
    if status.bots:
        console.print(view.bots_table(status.bots, stale_after))
        if waiting := view.outboxes(status.bots):
            console.print(waiting)
    else:
        console.print(Text("bots: none"))
    if status.groups:
        console.print()
        console.print(view.groups_table(status.groups))
    else:
        console.print(Text("groups: none"))


def format_duration(seconds: float | None) -> str:
    """Seconds for a person: "45s", "3m 12s", "2h 5m", "3d 4h"; "-" when unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return MISSING
    total = int(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


class _View:
    """Builds the renderables; styles are empty unless ``colour``."""

    def __init__(self, *, colour: bool) -> None:
        self.colour = colour

    def style(self, name: str) -> str:
        """``name`` on a terminal, no style elsewhere."""
        return name if self.colour else ""

    def header(self, manager: ManagerInfo) -> Text:
        """Who and where: version, pid, uptime, readiness, maintenance, endpoints, and the
        OS users the bots run as."""
        if manager.ready is None:
            readiness: tuple[str, str] = (f"ready {MISSING}", "")
        else:
            readiness = ("ready", "green") if manager.ready else ("not ready", "yellow")
        maintenance = ("maintenance on", "bold yellow") if manager.maintenance else None
        first = Text.assemble(
            (f"multibot {manager.version}", self.style("bold")),
            f"  pid {manager.pid}",
            f"  up {format_duration(manager.uptime)}",
            "  ",
            (readiness[0], self.style(readiness[1])),
            "  ",
            (maintenance[0], self.style(maintenance[1])) if maintenance else "maintenance off",
        )
        second = Text.assemble(
            f"redis {_url(manager.redis)}",
            f"  postgres {_url(manager.postgres)}",
            f"  data {manager.data_dir}",
        )
        lines = [first, second]
        if manager.api:
            lines.append(Text(f"api {manager.api}  (status page, /docs, /metrics)"))
        if manager.bot_users:
            lines.append(Text(f"bots run as OS users {', '.join(manager.bot_users)}"))
        elif manager.bot_users is not None:
            shared = "bots share the manager's user: isolation is Redis-only"
            lines.append(Text(shared, self.style("yellow")))
        if manager.memory_limits:
            enforced = f"bots' memory limits enforced by {manager.memory_limits}"
            if manager.memory_limits_reason:
                enforced += f" ({manager.memory_limits_reason})"
            lines.append(Text(enforced))
        return Text("\n").join(lines)

    def deployment(self, deployment: DeploymentStatus) -> Text:
        """The deployment's managers, one line each: host, the coordinator, its bots."""
        lines = [Text(f"deployment: this is {deployment.host}")]
        for host in deployment.hosts:
            state = "coordinator" if host.coordinator else "live" if host.live else "gone"
            style = "bold" if host.coordinator else "" if host.live else "red"
            bots = ", ".join(_with_replicas(b, host.replicas.get(b)) for b in host.bots)
            bots = bots or "no bots"
            lines.append(
                Text.assemble(
                    f"  {host.host}  ",
                    (state, self.style(style)),
                    f"  pid {host.pid}  seen {format_duration(host.seen_ago)} ago  {bots}",
                )
            )
        return Text("\n").join(lines)

    def memory(self, memory: MemoryStatus | None) -> Text:
        """Budget use, e.g. "memory 1.1 GiB / 2.0 GiB (55%)", and its three parts."""
        if memory is None:
            return Text(f"memory {MISSING}")
        line = Text(f"memory {_size(memory.used)} / {_size(memory.budget)}")
        if memory.used is not None and memory.budget:
            share = memory.used / memory.budget
            style = "red" if share >= 0.9 else "yellow" if share >= 0.8 else ""
            line.append(f" ({share:.0%})", self.style(style))
        for part in ("manager", "bots", "redis"):
            line.append(f"  {part} {_size(getattr(memory, part))}")
        return line

    def redis_memory(self, state: RedisMemoryStatus) -> Text:
        """Redis against its maxmemory, and what holds publishers back when they are."""
        if not state.maxmemory:
            return Text("redis maxmemory unset: nothing bounds Redis", self.style("yellow"))
        line = Text(f"redis {_size(state.used)} / {_size(state.maxmemory)} maxmemory")
        if not state.backpressure:
            return line
        line.append("  BACKPRESSURE: publishers held back", self.style("red"))
        for holder in state.holders:
            line.append(
                f"\n  held by group {holder.group} on stream {holder.stream} "
                f"(from entry {holder.since_id}, pending {holder.pending})"
            )
        return line

    def archive(self, archive: ArchiveStatus) -> Text:
        """The archiver: "archive ok  12034 events, 3 dead letters" or what is wrong."""
        line = Text("archive ")
        if archive.healthy:
            line.append("ok", self.style("green"))
        else:
            line.append(f"failing: {archive.last_error}", self.style("red"))
        line.append(f"  {archive.archived} events, "
                    f"{archive.dead_letters} dead letters archived this run")  # fmt: skip
        if archive.held:
            line.append(f", {archive.held} held for a full block")
        return line

    def bots_table(self, bots: Sequence[BotStatus], stale_after: float) -> Table:
        """One row per instance (one row for a bot with none)."""
        table = self.table(
            ("bot", "left"),
            ("instance", "right"),
            ("role", "left"),
            ("state", "left"),
            ("pid", "right"),
            ("uptime", "right"),
            ("restarts", "right"),
            ("RSS", "right"),
            ("heartbeat", "right"),
            ("last exit", "left"),
        )
        for bot in bots:
            bot_failed = bot.state in TROUBLE_STATES
            if not bot.instances:
                row_style = "red" if bot_failed else ""
                cells = [bot.id, MISSING, MISSING, str(bot.state), MISSING, MISSING]
                cells += [str(bot.restarts), MISSING, MISSING, MISSING]
                table.add_row(*map(Text, cells), style=self.style(row_style))
                continue
            for inst in bot.instances:
                state, age = inst.state, inst.heartbeat_age
                stale = age is not None and age >= stale_after
                failed = bot_failed or state in TROUBLE_STATES
                table.add_row(
                    Text(bot.id),
                    Text(str(inst.instance)),
                    Text(_text(inst.role)),
                    Text(
                        str(state),
                        self.style("yellow" if state in _YELLOW_STATES and not failed else ""),
                    ),
                    Text(_text(inst.pid)),
                    Text(format_duration(inst.uptime)),
                    Text(str(inst.restarts)),
                    Text(_size(inst.rss)),
                    Text(
                        format_duration(age),
                        self.style("yellow" if stale and not failed else ""),
                    ),
                    Text(_text(inst.last_exit)),
                    style=self.style("red" if failed else ""),
                )
        return table

    def outboxes(self, bots: Sequence[BotStatus]) -> Text | None:
        """ "not relayed yet: greeter 1200, matcher 3" for the outboxes that are not empty
        (usually none: the manager relays within milliseconds)."""
        waiting = [f"{b.id} {b.outbox}" for b in bots if b.outbox]
        if not waiting:
            return None
        line = "published, not relayed to their streams yet: " + ", ".join(waiting)
        return Text(line, self.style("yellow"))

    def groups_table(self, groups: Sequence[GroupStatus]) -> Table:
        """One row per consumer group and stream; a capped lag reads "100000+"."""
        table = self.table(
            ("stream", "left"),
            ("group", "left"),
            ("lag", "right"),
            ("pending", "right"),
            ("consumers", "right"),
        )
        for group in groups:
            lag = _text(group.lag)
            if group.lag_capped and group.lag is not None:
                lag += "+"
            table.add_row(
                Text(group.stream),
                Text(group.group),
                Text(lag),
                Text(str(group.pending)),
                Text(str(group.consumers)),
            )
        return table

    def table(self, *columns: tuple[str, str]) -> Table:
        """An empty table with these (header, justify) columns, styled for the console."""
        table = Table(
            box=box.SIMPLE,
            header_style=self.style("bold") or "none",
            show_edge=False,
            pad_edge=False,
        )
        for header, justify in columns:
            table.add_column(header, justify="right" if justify == "right" else "left")
        table.columns[-1].overflow = "fold"
        return table


def _text(value: Any) -> str:
    """A value as shown in a cell: "-" for None."""
    return MISSING if value is None else str(value)


def _size(value: int | None) -> str:
    """Bytes as "1.5 GiB", "-" for None."""
    return MISSING if value is None else format_size(value)


def _url(value: str | None) -> str:
    """An endpoint with its password hidden, "-" for None."""
    return MISSING if value is None else redact(value)


def _with_replicas(bot: str, indices: list[int] | None) -> str:
    """``bot``, or ``bot[0,2]`` when the host runs other replicas than just the first."""
    return bot if indices in (None, [0]) else f"{bot}[{','.join(map(str, indices))}]"
