"""Partitioned streams: a route split into N streams, each with its own hash tag.

A route with ``partitions = N`` (``[bus.partitions]``, by stream name) is N streams,
``<name>.p0`` … ``<name>.p<N-1>`` (keys ``<ns>:stream:{<name>.p3}``), which Redis Cluster
spreads over its shards. An event with a key goes to partition ``hash(key) mod N``, so one
key's events stay in one stream, in order; an event without a key goes to any (spread by
time). The hash is the first 32 bits of the key's SHA-1, which the outbox relay's script
computes the same way (``redis.sha1hex``), so a bot's events land where its direct publish
would put them.

Within a group, each partition is handled by one replica at a time
(:mod:`bus.partition_owner`), so per-key order holds across replicas.
"""

from __future__ import annotations

import hashlib
import re

#: Most partitions a route may have (a consumer runs one reader per partition it owns).
MAX_PARTITIONS = 256

_PARTITION = re.compile(r"^(?P<base>.+)\.p(?P<index>0|[1-9][0-9]{0,2})$")


def partition_of(key: str, count: int) -> int:
    """The partition of ``key`` among ``count``: the first 32 bits of its SHA-1, mod."""
    return int(hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:8], 16) % count


def partition_name(stream: str, index: int) -> str:
    """The name of partition ``index`` of ``stream`` (``user`` → ``user.p3``)."""
    return f"{stream}.p{index}"


def split_partition(name: str) -> tuple[str, int] | None:
    """``user.p3`` → ``("user", 3)``; None for a name that is no partition's."""
    match = _PARTITION.match(name)
    return (match["base"], int(match["index"])) if match else None
