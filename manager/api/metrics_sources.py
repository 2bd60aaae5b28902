"""Gather what ``GET /metrics`` shows from the running manager, then render it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bus.keys import GROUP_PREFIX
from bus.outbox import outbox_backlog
from manager.observe.metrics import MetricsInput, archive_lag, gather_streams, render

if TYPE_CHECKING:
    from manager.api.view import DaemonView


async def render_metrics(view: DaemonView) -> bytes:
    """The Prometheus exposition: fleet counters from the bots, the manager's own state,
    and what Redis says now about the streams."""
    bus = view.bus
    streams = await gather_streams(bus.redis, bus.keys)
    archive, behind = None, {}
    if view.archiver is not None:
        archive, behind = view.archiver.status(), await archive_lag(bus.redis, bus.keys)
    coordinator = view.coordinator
    bots = view.supervisor.status()
    outboxes = await outbox_backlog(bus.redis, bus.keys, [b.id for b in bots])
    groups = coordinator.group_status()  # the coordinator's only: empty elsewhere
    missed = {g.group: 0 for g in groups if g.group.startswith(GROUP_PREFIX)}
    return render(
        MetricsInput(
            fleet=view.supervisor.metrics.snapshot(),
            bots=bots,
            memory=coordinator.memory_status(),
            groups=groups,
            redis_memory=coordinator.redis_memory_status(),
            streams=streams,
            archive=archive,
            archive_lag=behind,
            dead_letters=await bus.dlq.count(),
            api_requests=dict(view.requests),
            outboxes=outboxes,
            missed=missed | coordinator.missed_deliveries(),
        )
    )
