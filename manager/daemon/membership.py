"""This manager as one of a deployment's: its entry among the managers, its share of the
unplaced bots, and the deployment-wide duties it runs while it coordinates (see
:mod:`.hosts`, :mod:`.placement`, :mod:`.leadership`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.keys import Keys
from manager.archive.group_positions import record_positions
from manager.archive.retention import run_retention
from manager.config import BotConfig, ManagerSettings
from manager.daemon.hosts import HostRegistry
from manager.daemon.leadership import StartDuties
from manager.daemon.parts import Parts
from manager.daemon.placement import Placement
from manager.errors import ManagerError

log = structlog.get_logger("manager")


async def join_deployment(
    admin: Redis,
    keys: Keys,
    settings: ManagerSettings,
    bots: Callable[[], Sequence[BotConfig]],
    running: Callable[[], Iterable[str]],
) -> tuple[HostRegistry, Placement]:
    """Register this manager among the deployment's, and take the unplaced bots that are
    free; refuse (:class:`ManagerError`) to run a bot placed on this host that another
    live manager runs. ``bots``: the running config's; ``running``: the ids this manager
    runs, for its entry."""
    registry = HostRegistry(admin, keys, settings.host, settings.coordinator.interval, running)
    placed_here = [b.id for b in settings.bots if b.hosts and settings.host in b.hosts]
    taken = await registry.taken_elsewhere(placed_here)
    if taken:
        where = ", ".join(f"{bot} (on {host})" for bot, host in sorted(taken.items()))
        raise ManagerError(
            f"another manager of this deployment runs {where}, and this one "
            f"(host {settings.host!r}) would too: name one host in each bot's hosts "
            "= [...] (or none: one manager runs it), or stop the other manager first"
        )
    placement = Placement(admin, keys, settings.host, settings.coordinator.lease_ttl, bots)
    await placement.round()  # the unplaced bots free now are this manager's
    await registry.write()
    return registry, placement


async def leave_deployment(registry: HostRegistry | None, placement: Placement | None) -> None:
    """A clean stop, once the bots stopped: this manager's entry deleted, its unplaced
    bots given up for another manager to run."""
    with contextlib.suppress(Exception):
        if registry is not None:
            await registry.leave()
    with contextlib.suppress(Exception):
        if placement is not None:
            await placement.release_all()


def coordinator_duties(
    tg: asyncio.TaskGroup, parts: Parts, keys: Keys, settings: ManagerSettings
) -> StartDuties:
    """The deployment-wide work, started in ``tg`` by the coordinating manager only.
    Taking over from a dead coordinator, first what it may have left: streams Redis lost
    while nobody watched are restored (a manager's own start did that already)."""

    def start(took_over: bool) -> list[asyncio.Task[Any]]:
        positions = record_positions(
            parts.clients.admin, keys, parts.archive.get, settings.coordinator
        )
        first = [tg.create_task(parts.repair.restore())] if took_over else []
        return [
            *first,
            tg.create_task(parts.relay.run()),
            tg.create_task(parts.fanout.run()),
            tg.create_task(parts.archiver.run()),
            tg.create_task(parts.trimmer.run()),
            tg.create_task(positions),
            tg.create_task(parts.pressure.run()),
            tg.create_task(run_retention(parts.archive.get, settings.archive)),
            tg.create_task(parts.repair.watch_identity()),
        ]

    return start


async def follow_placement(
    placement: Placement, interval: float, apply: Callable[[], Awaitable[None]]
) -> None:
    """Each ``interval``, take unplaced bots that are free (their manager died) and drop
    those another manager took; ``apply`` then starts and stops them as a reload would."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await placement.round():
                await apply()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("cannot follow the placement of unplaced bots", error=str(exc))
