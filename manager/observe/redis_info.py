"""``INFO`` of each primary: one node's own, or every shard's of a Redis Cluster.

A cluster client sends ``INFO`` to every node and folds the replies into one, which hides
what an operator needs per shard: the fullest shard's memory (each node has its own
``maxmemory``), and each primary's ``run_id`` (a restarted shard may have come back
empty). These ask each primary on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bus.connection import is_cluster


async def primaries_info(redis: Redis, section: str) -> dict[str, dict[str, Any]]:
    """``INFO section`` of each primary, by its ``host:port`` (``""`` for one node)."""
    if not is_cluster(redis):
        info: Any = await redis.info(section)
        return {"": info}
    cluster: Any = redis
    await cluster.initialize()
    primaries = list(cluster.get_primaries())
    replies = await asyncio.gather(
        *(cluster.info(section, target_nodes=node) for node in primaries)
    )
    return {node.name: reply for node, reply in zip(primaries, replies, strict=True)}


@dataclass(frozen=True, slots=True)
class ShardMemory:
    """One primary's memory, as INFO memory gives it."""

    node: str
    used: int
    maxmemory: int
    policy: str

    @property
    def ratio(self) -> float:
        """Used over the limit; 0 when the node has no limit."""
        return self.used / self.maxmemory if self.maxmemory > 0 else 0.0


async def shard_memory(redis: Redis) -> list[ShardMemory]:
    """Each primary's memory, the fullest (by ratio to its limit, then bytes) first."""
    found = [
        ShardMemory(
            node,
            int(info["used_memory"]),
            int(info.get("maxmemory") or 0),
            str(info.get("maxmemory_policy") or ""),
        )
        for node, info in (await primaries_info(redis, "memory")).items()
    ]
    return sorted(found, key=lambda s: (s.ratio, s.used), reverse=True)
