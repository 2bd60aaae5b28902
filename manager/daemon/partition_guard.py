"""A change of a route's partition count, allowed only once its partitions are drained.

``hash(key) mod N`` sends a key's events to another partition when N changes. While the
old partitions still hold events not yet handled, a key's new events (in its new
partition) could be handled before its old ones: per-key order would break. So the
manager records the counts it runs with (``<ns>:partitions``, a hash) and, at start,
refuses a changed count while any group still has events to handle in that route's
current streams, saying how to drain them (README: Partitions). Once they are drained the
new count is recorded and used.
"""

from __future__ import annotations

from typing import Any

import structlog
from redis.asyncio import Redis

from bus.keys import ARCHIVER_GROUP, Keys
from bus.routing import Router
from manager.errors import ManagerError
from manager.observe.lag import group_lags

log = structlog.get_logger("manager")


def layout_key(keys: Keys) -> str:
    """The hash of the partition count each route runs with (stream name → N)."""
    return f"{keys.namespace}:partitions"


async def check_partition_change(redis: Redis, keys: Keys, router: Router) -> dict[str, int]:
    """Record ``router``'s partition counts, or raise :class:`ManagerError` when one
    changed while its streams still hold events a group has not handled; the counts that
    changed (stream name → new N)."""
    recorded: Any = await redis.hgetall(layout_key(keys))
    before = {_text(k): int(v) for k, v in recorded.items()}
    named = {*router.routes.values(), router.default}
    now = {name: router.partitions.get(name, 1) for name in named}
    changed = {name: n for name, n in now.items() if before.get(name, 1) != n}
    for name in sorted(changed):
        old = Router({}, name, {name: before.get(name, 1)})
        waiting = await _backlog(redis, keys, [keys.stream(s) for s in old.expand(name)])
        if waiting:
            raise ManagerError(
                f"partitions of {name!r} change from {before.get(name, 1)} to {changed[name]} "
                f"while {waiting} event(s) in its streams wait for a group; a key's new events "
                "would go to another partition and could be handled before its old ones. "
                "Drain first: start with the old count, `multibot maintenance on` (publishers "
                "hold), wait until `multibot status` shows no lag on those streams, stop, "
                "then start with the new count"
            )
    if changed or not before:
        mapping: Any = now
        await redis.hset(layout_key(keys), mapping=mapping)
    if changed:
        log.warning("partition counts changed (their old streams were drained)", streams=changed)
    return changed


async def _backlog(redis: Redis, keys: Keys, streams: list[str]) -> int:
    """Events not yet handled in ``streams`` by any group but the archiver's (which keeps
    no order): not delivered, or delivered and not acked."""
    lags = await group_lags(redis, streams, keys=keys)
    return sum((g.lag or 0) + g.pending for g in lags if g.group != ARCHIVER_GROUP)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
