"""The replicas of the manager's Redis primary, reached directly: ACL users are not
replicated, so a bot's users must be set on every node that may become the primary.

Redis keeps ACL users per node (``ACL SETUSER`` is not sent to replicas). A Sentinel
failover promotes a replica; if the bots' users were set on the primary only, every bot is
locked out of the new primary. The manager therefore sets them on the primary and on each
replica the primary lists (``INFO replication``), with the primary's login; it does so
again whenever the primary changes (a failover gives a new ``run_id``, and the manager
prepares the bots again, see ``redis_repair``).

On a Redis Cluster, every node keeps its own users too: there the "replicas" are every node
of the cluster, primaries and replicas, as the cluster client last learned them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.connection import is_cluster, redact
from bus.deployment import parse_redis_url

log = structlog.get_logger("manager")


async def replica_addresses(primary: Redis) -> list[tuple[str, int]]:
    """``(ip, port)`` of each replica connected to ``primary`` (none when it has none, or
    when it is a replica itself)."""
    info: Any = await primary.info("replication")
    found = []
    for name, value in info.items():
        if name.startswith("slave") and isinstance(value, dict) and "port" in value:
            found.append((str(value["ip"]), int(value["port"])))
    return found


async def cluster_addresses(cluster: Redis) -> list[tuple[str, int]]:
    """``(host, port)`` of every node of a Redis Cluster (primaries first), as it names
    them now."""
    client: Any = cluster
    await client.initialize()
    nodes = [*client.get_primaries(), *client.get_replicas()]
    return [(str(node.host), int(node.port)) for node in nodes]


async def other_nodes(redis: Redis) -> list[tuple[str, int]]:
    """The nodes besides the one ``redis`` writes to that keep users of their own: the
    primary's replicas, or every node of a cluster."""
    if is_cluster(redis):
        return await cluster_addresses(redis)
    return await replica_addresses(redis)


@contextlib.asynccontextmanager
async def replica_clients(primary: Redis, primary_url: str) -> AsyncIterator[list[Redis]]:
    """A client for each replica of ``primary``, logged in as ``primary_url`` logs in (its
    user, password, database and TLS); closed on the way out. A replica that the primary
    lists but that cannot be listed (the primary went away) gives none."""
    target = parse_redis_url(primary_url)
    try:
        addresses = await other_nodes(primary)
    except RedisError as exc:
        log.warning("cannot list the Redis replicas", error=str(exc), url=redact(primary_url))
        addresses = []
    clients = [
        Redis.from_url(target.node_url(host, port), decode_responses=True, socket_timeout=5.0)
        for host, port in addresses
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


def describe(client: Redis) -> str:
    """``host:port`` of a replica client, for logs."""
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"
