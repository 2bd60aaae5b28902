"""Every Redis key and group name the bus uses, built in one place.

Keys carry the deployment's namespace so several deployments can share one Redis, and
each stream key carries a hash tag (``{...}``) so that under Redis Cluster a stream, its
groups and its bookkeeping live on one shard.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_PREFIX = "bot-group-"
#: The archiver's consumer group on every stream (and the dead-letter stream).
ARCHIVER_GROUP = "archiver"
#: Its consumer name: stable, so a restarted manager finds the batch it had taken.
ARCHIVER_CONSUMER = "archiver-0"


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

    def outbox(self, bot_id: str) -> str:
        """A bot's outbox: what it publishes (and dead-letters) when the manager runs it. The
        manager's relay moves each entry to its stream and stamps its ``source``."""
        return f"{self.namespace}:outbox:{{{bot_id}}}"

    def dead_letters(self) -> str:
        """The dead-letter stream of the namespace."""
        return f"{self.namespace}:dlq"

    def pressure(self) -> str:
        """The manager's backpressure flag: set while Redis is near its ``maxmemory``."""
        return f"{self.namespace}:pressure"

    def idempotency(self, group: str, handler: str, event_id: str, source: str) -> str:
        """Run-once marker of an event for one handler of a group. Keyed by the event's id
        *and* its source: a publisher's retries (same source, same id) are duplicates, but
        a bot reusing another's event id (the relay stamps its own source) cannot make a
        handler skip the real event."""
        return f"{self.namespace}:idem:{group}:{handler}:{event_id}:{source}"

    def idempotency_prefix(self, group: str) -> str:
        """Prefix of every run-once marker of a group (what a bot's ACL user may touch)."""
        return f"{self.namespace}:idem:{group}:"

    def bot_state(self, bot_id: str, *parts: str | int) -> str:
        """A key of a bot's own state, e.g. ``multibot:bot:greeter:role:42``.

        A bot run by the manager may read and write only its own ``bot_state`` keys (plus
        the streams, the dead-letter stream and its run-once markers).
        """
        return ":".join([f"{self.namespace}:bot:{bot_id}", *map(str, parts)])

    def lease(self, bot_id: str) -> str:
        """Leader lease of an active/standby bot: ``<instance> <fencing token>``, with a TTL."""
        return f"{self.namespace}:lease:{bot_id}"

    def fence(self, bot_id: str) -> str:
        """Counter of the bot's lease holders: each new holder gets the next fencing token."""
        return f"{self.namespace}:lease:{bot_id}:fence"
