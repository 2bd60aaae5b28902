"""This manager as one of a deployment's: its entry among the managers, its share of the
unplaced bots, and the deployment-wide duties it runs while it coordinates (see
:mod:`.hosts`, :mod:`.placement`, :mod:`.leadership`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
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
    running: Callable[[], Mapping[str, Sequence[int]]],
) -> tuple[HostRegistry, Placement]:
    """Register this manager among the deployment's, and take its share of the spread
    bots' replicas that are free; refuse (:class:`ManagerError`) to run a bot placed on
    this host alone that another live manager runs. ``bots``: the running config's;
    ``running``: the replicas this manager runs, per bot, for its entry."""
    registry = HostRegistry(admin, keys, settings.host, settings.coordinator.interval, running)
    placed_here = [b.id for b in settings.bots if b.hosts == [settings.host]]
    taken = await registry.taken_elsewhere(placed_here)
    if taken:
        where = ", ".join(f"{bot} (on {host})" for bot, host in sorted(taken.items()))
        raise ManagerError(
            f"another manager of this deployment runs {where}, and this one "
            f"(host {settings.host!r}) would too: name one host in each bot's hosts "
            "= [...] (or none: one manager runs it), or stop the other manager first"
        )
    await registry.write()  # first: the others count this manager in their shares
    placement = Placement(
        admin, keys, settings.host, settings.coordinator.lease_ttl, bots,
        live_hosts=registry.live_hosts,
    )  # fmt: skip
    await placement.round()  # this manager's share of the free replicas
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

    Any start but the manager's first (its own start restored already) puts back first
    what Redis may have lost while nobody here watched: taking over from a dead
    coordinator, or leading again after the lease ran out while Redis was away (it may
    be back empty). The other duties wait for that restore, so the relay and the fanout
    do not write new entries into a stream before its archived ones are back (a restore
    cannot put entries under their ids below newer ones)."""
    first = True

    def start(took_over: bool) -> list[asyncio.Task[Any]]:
        nonlocal first
        gate = None if first and not took_over else tg.create_task(_restore(parts))
        first = False
        positions = record_positions(
            parts.clients.admin, keys, parts.archive.get, settings.coordinator
        )
        duties: list[Coroutine[Any, Any, None]] = [
            parts.relay.run(),  # pumps the fanout too, where it can (not on a cluster)
            *([] if parts.relay.drives_fanout else [parts.fanout.run()]),
            *([] if settings.archive.on_every_host else [parts.archiver.run()]),
            parts.trimmer.run(),
            positions,
            parts.pressure.run(),
            run_retention(parts.archive.get, settings.archive, settings.audit.retention_days),
            parts.repair.watch_identity(),
            parts.audit.run(),
            parts.deliveries.run(),
            parts.missed.run(),
        ]
        return [
            *([gate] if gate else []),
            *(tg.create_task(_after(gate, duty)) for duty in duties),
        ]

    return start


async def _restore(parts: Parts) -> None:
    try:
        await parts.repair.restore()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the duties go on; watch_identity tries again on a change
        log.warning("cannot restore what Redis lost", error=str(exc))


async def _after(gate: asyncio.Task[None] | None, duty: Coroutine[Any, Any, None]) -> None:
    """``duty``, once ``gate`` (the restore) ended, however it ended."""
    try:
        if gate is not None:
            await asyncio.wait([gate])
    except BaseException:
        duty.close()
        raise
    await duty


async def follow_placement(interval: float, step: Callable[[], Awaitable[None]]) -> None:
    """Each ``interval``, ``step``: take the unplaced bots that are free (their manager
    died), drop those another manager took, and start and stop them as a reload would
    (one step under the reload's lock, so a round never judges by a config being
    replaced)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("cannot follow the placement of unplaced bots", error=str(exc))
