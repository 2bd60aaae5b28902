"""Every Redis key and group name the bus uses, built in one place.

Keys carry the deployment's namespace so several deployments can share one Redis, and
each stream key carries a hash tag (``{...}``) so that under Redis Cluster a stream, its
groups and its bookkeeping live on one shard.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_PREFIX = "bot-group-"


def group_name(bot_id: str) -> str:
    """Consumer group of a bot: one per subscribing bot per stream."""
    return f"{GROUP_PREFIX}{bot_id}"


def consumer_name(bot_id: str, instance: int | str) -> str:
    """Stable consumer name: the same after a restart, so pending entries are found again."""
    return f"{bot_id}-{instance}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str = "multibot"

    def stream(self, name: str) -> str:
        """The stream a routing table entry names, e.g. ``multibot:stream:{user}``."""
        return f"{self.namespace}:stream:{{{name}}}"

    def stream_prefix(self) -> str:
        """Prefix shared by every stream key of the namespace (for SCAN MATCH)."""
        return f"{self.namespace}:stream:"

    def stream_name(self, key: str) -> str:
        """Inverse of :meth:`stream`: ``multibot:stream:{user}`` → ``user``."""
        return key.removeprefix(self.stream_prefix()).strip("{}")

    def dead_letters(self) -> str:
        """The dead-letter stream of the namespace."""
        return f"{self.namespace}:dlq"

    def idempotency(self, group: str, handler: str, event_id: str) -> str:
        """Run-once marker of an event for one handler of a group."""
        return f"{self.namespace}:idem:{group}:{handler}:{event_id}"
