"""Memory use of the fleet against its budget: measuring it, sizes as text, alerts.

Sizes use binary units throughout: K, M, G and T mean 1024, 1024², 1024³ and 1024⁴ bytes
whether written "G", "GB" or "GiB". Memory is sold and reported by the kernel in powers of
two, so "2GB" in a config file almost always means 2 GiB; one meaning avoids a budget that
is silently 7% smaller than the operator thinks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import psutil
from redis.asyncio import Redis

from manager.observe.proc_access import OsIds, seeing_as
from manager.observe.redis_info import shard_memory
from manager.observe.thresholds import Threshold, ThresholdWatch

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[KMGT])(?:I?B)?|B)?", re.I)


def tree_rss(pid: int, owner: OsIds | None = None) -> int | None:
    """Resident memory in bytes of process ``pid`` and all its descendants, or None when
    ``pid`` cannot be seen (it exited, or /proc hides it: see :mod:`.proc_access`).

    ``owner`` is the OS user ``pid`` runs as, when that is not ours: the walk then reads
    /proc as that user. A descendant that exits during the walk (or that we may not
    inspect) counts as 0. Pages shared between processes (e.g. after fork) are counted
    once per process, so the sum can exceed what the tree really costs.
    """
    with seeing_as(owner):
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for process in processes:
            try:
                total += int(process.memory_info().rss)
            except psutil.Error:  # gone (NoSuchProcess, ZombieProcess) or not ours
                continue
        return total


async def redis_used_memory(redis: Redis) -> int:
    """Bytes Redis has allocated for its data (INFO memory ``used_memory``); on a cluster,
    the sum over its primaries (each shard's own figure: :func:`shard_memory`)."""
    return sum(shard.used for shard in await shard_memory(redis))


def parse_size(text: str | int) -> int:
    """A size in bytes from an int or text like "2GB", "2G", "512MiB", "512m", "100k", "1.5G".

    Units are binary (see the module docstring). Raises ValueError for anything else,
    including negative sizes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid size {text}: a size cannot be negative")
        return text
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"invalid size {text!r}: use a number of bytes or a size like 512MB, 2GB")
    number = float(match["number"])
    return round(number * (1 << 10 * _UNITS[(match["unit"] or "").upper()]))


def format_size(n: int) -> str:
    """``n`` bytes for a person: "512 B", "1.5 GiB" (binary units, one decimal)."""
    sign, size = ("-" if n < 0 else ""), float(abs(n))
    if size < 1024:
        return f"{sign}{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if round(size, 1) < 1024:
            return f"{sign}{size:.1f} {unit}"
    return f"{sign}{size / 1024:.1f} TiB"


@dataclass
class MemorySample:
    """One measurement of the fleet's memory, in bytes.

    The parts must not overlap: ``manager`` is the manager process alone (not
    :func:`tree_rss` of it, whose tree holds the bots and an embedded redis-server),
    ``bots`` the tree RSS of each bot's processes by bot id, ``redis`` Redis's memory.
    """

    manager: int
    bots: dict[str, int] = field(default_factory=dict)
    redis: int = 0

    @property
    def total(self) -> int:
        """Everything counted against the budget."""
        return self.manager + sum(self.bots.values()) + self.redis


@dataclass(frozen=True, slots=True)
class MemoryAlert:
    """The total or one bot crossed its line: ``raised`` going up, cleared coming back down."""

    #: "total" for the whole fleet, "bot" for one bot's own limit.
    scope: Literal["total", "bot"]
    #: "total", or the bot id.
    key: str
    raised: bool
    #: Bytes measured.
    value: int
    #: The budget (total) or the bot's limit, in bytes.
    limit: int

    def __str__(self) -> str:
        what = "memory" if self.scope == "total" else f"bot {self.key} memory"
        state = "over" if self.raised else "back under"
        line = "budget" if self.scope == "total" else "limit"
        percent = f"{self.value / self.limit:.0%}" if self.limit else "-"
        return (
            f"{what} {state} its {line}: {format_size(self.value)} of "
            f"{format_size(self.limit)} ({percent})"
        )


class MemoryBudget:
    """Turns memory samples into alerts, one per crossing.

    The total raises at ``high`` x ``total_bytes`` and clears at ``low`` x ``total_bytes``;
    each bot in ``per_bot_limits`` raises at its limit and clears at 90% of it. A bot
    missing from a sample (e.g. restarting) keeps its state; bots without a limit count
    only towards the total.
    """

    def __init__(
        self,
        total_bytes: int,
        high: float = 0.9,
        low: float = 0.8,
        per_bot_limits: Mapping[str, int] | None = None,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {total_bytes} bytes")
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"memory budget fractions need 0 < low <= high <= 1, got low={low} high={high}"
            )
        limits = dict(per_bot_limits or {})
        for bot, limit in limits.items():
            if limit <= 0:
                raise ValueError(f"memory limit of bot {bot} must be positive, got {limit}")
        self.total_bytes = total_bytes
        self.per_bot_limits: Mapping[str, int] = limits
        self._total = ThresholdWatch[str](Threshold(high * total_bytes, low * total_bytes))
        self._bots = ThresholdWatch[str](
            Threshold(0, 0),  # unused: every watched bot has its own line
            {bot: Threshold(limit, 0.9 * limit) for bot, limit in limits.items()},
        )

    def check(self, sample: MemorySample) -> list[MemoryAlert]:
        """The alerts ``sample`` causes: the total's first, then bots' in sample order."""
        alerts: list[MemoryAlert] = []
        if crossing := self._total.update("total", sample.total):
            alerts.append(
                MemoryAlert("total", "total", crossing.raised, sample.total, self.total_bytes)
            )
        for bot, rss in sample.bots.items():
            limit = self.per_bot_limits.get(bot)
            if limit is not None and (crossing := self._bots.update(bot, rss)):
                alerts.append(MemoryAlert("bot", bot, crossing.raised, rss, limit))
        return alerts

    @property
    def over(self) -> frozenset[str]:
        """Keys currently raised: "total" if the fleet is over its budget, plus bot ids."""
        return self._total.active | self._bots.active

    def __repr__(self) -> str:
        return (
            f"<MemoryBudget total={format_size(self.total_bytes)} "
            f"bots_limited={len(self.per_bot_limits)} over={sorted(self.over)}>"
        )
