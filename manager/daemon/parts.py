"""The parts of one manager run, built on the started Redis and PostgreSQL (nothing of them
runs yet: :mod:`manager.daemon.manager` starts them in its task group)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bus import BusClient
from bus.cluster_relay import Durable
from bus.fanout import Fanout
from bus.keys import Keys
from bus.outbox import OutboxRelay
from bus.routing import Router
from bus.settings import BusSettings
from manager.announcer import Announcer
from manager.archive.archiver import Archiver
from manager.archive.caught_up import archive_caught_up
from manager.archive.deliveries import DeliveriesCopier
from manager.archive.link import ArchiveLink
from manager.archive.missed import MissedDeliveries
from manager.archive.pressure import PressureWatch
from manager.archive.trimmer import Trimmer
from manager.audit import AuditCopier
from manager.config import BotConfig, ManagerSettings
from manager.daemon.isolation import BotUsers
from manager.daemon.provision import Provisioner
from manager.daemon.redis_acl import bots_base_url
from manager.daemon.redis_repair import RedisRepair
from manager.embedded.services import Services
from manager.supervision.cgroups import CgroupLimiter
from manager.supervision.coordinator import Coordinator
from manager.supervision.group_grants import GroupGrants
from manager.supervision.supervisor import Supervisor


@dataclass(frozen=True)
class Clients:
    """The manager's connections: its admin Redis client and its two bus clients."""

    admin: Redis
    bus: BusClient
    system_bus: BusClient  # the manager's own events, past backpressure
    announcer: Announcer  # publishes through system_bus


@dataclass(frozen=True)
class Parts:
    """What one run supervises, coordinates, archives and repairs, on ``clients``."""

    clients: Clients
    archive: ArchiveLink
    provisioner: Provisioner
    supervisor: Supervisor
    coordinator: Coordinator
    archiver: Archiver
    trimmer: Trimmer
    pressure: PressureWatch
    repair: RedisRepair
    relay: OutboxRelay
    fanout: Fanout
    audit: AuditCopier
    deliveries: DeliveriesCopier
    missed: MissedDeliveries


@dataclass(frozen=True)
class Context:
    """What the parts are built from besides the clients."""

    settings: ManagerSettings
    services: Services
    bus_settings: BusSettings
    keys: Keys
    router: Router
    environ: Mapping[str, str]
    #: The OS users the bots run as.
    users: BotUsers
    #: Puts bot processes in memory cgroups of their own; None: RSS polling only.
    limiter: CgroupLimiter | None
    #: The running config's bots (a reload changes them): the whole deployment's.
    bots: Callable[[], Sequence[BotConfig]]
    #: Of those, the ones this manager runs (placed on its host).
    local_bots: Callable[[], Sequence[BotConfig]]


def build_parts(context: Context, clients: Clients, archive: ArchiveLink) -> Parts:
    """The supervisor, coordinator, archiver and their helpers, wired to each other."""
    settings, keys, admin, announcer = (
        context.settings,
        context.keys,
        clients.admin,
        clients.announcer,
    )
    services = context.services
    # Copies each routed stream's entries into its subscribers' inboxes (bus.fanout).
    fanout = Fanout(admin, keys, lambda: [keys.stream(s) for s in context.router.streams()])
    provisioner = Provisioner(
        settings,
        admin=admin,
        admin_url=services.redis_url,
        keys=keys,
        # Never the manager's own TLS client certificate: a bot is untrusted code.
        redis_url=bots_base_url(services.bots_redis_url, settings.redis_tls.bot_cert),
        archive=archive,
        environ=context.environ,
        users=context.users,
    )
    supervisor = Supervisor(
        settings.supervisor,
        spec_factory=provisioner.spec,
        announcer=announcer,
        redis=admin,
        keys=keys,
        visibility_timeout=context.bus_settings.consumer.visibility_timeout,
        grants=GroupGrants(admin, keys, context.router, fanout),
        limiter=context.limiter,
    )
    supervisor.metrics.add_local(clients.bus.metrics)
    supervisor.metrics.add_local(clients.system_bus.metrics)
    coordinator = Coordinator(
        settings.coordinator,
        redis=admin,
        keys=keys,
        router=context.router,
        announcer=announcer,
        supervisor=supervisor,
        fanout=fanout,
        extra_pids=lambda: services.memory_pids,
    )
    archiver = Archiver(
        admin,
        keys,
        settings.archive,
        archive.get,
        announce=announcer.announce,
        max_data_bytes=context.bus_settings.max_event_bytes,
        **_archiver_consumer(settings),
    )
    trimmer, pressure = _memory_keepers(context, admin, coordinator, announcer)
    repair = RedisRepair(
        admin,
        keys=keys,
        router=context.router,
        archive=archive,
        system_bus=clients.system_bus,
        settings=settings.archive,
        interval=settings.coordinator.interval,
        bots=context.bots,
        provision=lambda: provisioner.prepare_bots(
            context.local_bots(), coordinator, deployment=context.bots()
        ),
        fanout=fanout,
    )
    relay = OutboxRelay(
        admin, keys, context.router, lambda: [b.id for b in context.bots()],
        durable=Durable.of(context.bus_settings), fanout=fanout,
    )  # fmt: skip
    missed = MissedDeliveries(
        archive.get,
        settings.audit.missed_after,
        caught_up=lambda until, now: archive_caught_up(admin, keys, until, now),
    )
    coordinator.missed_deliveries = missed.totals  # what /metrics reports
    return Parts(
        clients,
        archive,
        provisioner,
        supervisor,
        coordinator,
        archiver,
        trimmer,
        pressure,
        repair,
        relay,
        fanout,
        AuditCopier(admin, keys, archive.get),
        DeliveriesCopier(admin, keys, archive.get),
        missed,
    )


def _archiver_consumer(settings: ManagerSettings) -> dict[str, Any]:
    """One archiver per deployment keeps one consumer name, whichever manager leads (it
    finds its batch in flight when the lead moves); one per manager names its host."""
    if not settings.archive.on_every_host:
        return {}
    return {"consumer": f"archiver-{settings.host}", "leave_on_stop": True}


def _memory_keepers(
    context: Context, admin: Redis, coordinator: Coordinator, announcer: Announcer
) -> tuple[Trimmer, PressureWatch]:
    """The trimmer, and the watch that holds publishers back when Redis is nearly full."""
    settings, keys = context.settings, context.keys
    trimmer = Trimmer(admin, keys, settings.archive, announcer)
    pressure = PressureWatch(admin, keys, trimmer, announcer, settings.coordinator.memory)
    coordinator.pressure = pressure.state
    return trimmer, pressure
