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
#: The manager's group on every routed stream that copies each entry into the inbox of
#: every group subscribed to the stream (see :mod:`bus.fanout`).
FANOUT_GROUP = "fanout"
#: Its consumer name.
FANOUT_CONSUMER = "fanout-0"


def group_name(bot_id: str) -> str:
    """Consumer group of a bot: one per subscribing bot per stream."""
    return f"{GROUP_PREFIX}{bot_id}"


def consumer_name(bot_id: str, instance: int | str) -> str:
    """Stable consumer name: the same after a restart, so pending entries are found again."""
    return f"{bot_id}-{instance}"


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key``: the text between its first ``{`` and the next
    ``}`` when that is not empty, else the whole key. A key named ``...{<hash_tag(k)>}`` is
    in ``k``'s slot."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


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

    def inbox(self, group: str, stream: str) -> str:
        """A group's inbox for a routed stream key: the copies the manager's fanout makes of
        the stream's entries, same ids, e.g. ``multibot:inbox:bot-group-a:{user}``. Only that
        group exists on it, so a bot's Redis user reaches its own group and no other. The
        hash tag is the stream's: under Redis Cluster a stream and its inboxes share a slot.
        """
        return f"{self.inbox_prefix(group)}{stream.removeprefix(self.stream_prefix())}"

    def inbox_prefix(self, group: str) -> str:
        """Prefix of every inbox of a group (what a bot's stream user may touch)."""
        return f"{self.namespace}:inbox:{group}:"

    def routed_stream(self, key: str) -> str:
        """The routed stream an inbox key copies (any other key: itself)."""
        prefix = f"{self.namespace}:inbox:"
        if not key.startswith(prefix):
            return key
        _group, _, rest = key.removeprefix(prefix).partition(":")
        return f"{self.stream_prefix()}{rest}" if rest else key

    def group_key(self, stream: str, group: str) -> str:
        """Where ``group`` reads ``stream`` under the manager: a bot's group in its inbox,
        the manager's own groups (archiver, fanout) on the stream itself."""
        return self.inbox(group, stream) if group.startswith(GROUP_PREFIX) else stream

    def subscribers(self, stream: str) -> str:
        """The set of groups whose inboxes the fanout fills from ``stream`` (same slot)."""
        return f"{self.namespace}:subscribers:{stream.removeprefix(self.stream_prefix())}"

    def outbox(self, bot_id: str) -> str:
        """A bot's outbox: what it publishes (and dead-letters) when the manager runs it. The
        manager's relay moves each entry to its stream and stamps its ``source``."""
        return f"{self.namespace}:outbox:{{{bot_id}}}"

    def relay_cursor(self, target: str) -> str:
        """A hash in ``target``'s slot: per bot, the last outbox entry the relay appended
        to ``target`` on a cluster (where the append and the outbox's trim cannot be one
        script), so a relay round repeated after a crash appends nothing twice."""
        return f"{self.namespace}:relayed:{{{hash_tag(target)}}}"

    def retry_marker(self, stream: str, dlq_id: str) -> str:
        """Set in ``stream``'s slot when a dead letter was re-added there on a cluster (the
        re-add and the letter's delete are two steps there): its value is the new entry's
        id, so a retry repeated after a crash adds nothing twice."""
        return f"{self.namespace}:retried:{{{hash_tag(stream)}}}:{dlq_id}"

    def dead_letters(self) -> str:
        """The dead-letter stream of the namespace."""
        return f"{self.namespace}:dlq"

    def deliveries(self) -> str:
        """The stream of delivery records on their way to the archive (written by the
        outbox relay, copied and deleted by the coordinator)."""
        return f"{self.namespace}:deliveries"

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
        """Leader lease of an active/standby bot: ``<instance> <fencing token>``, with a TTL.
        Its hash tag is the bot's, so the lease and its fence share a slot on a cluster."""
        return f"{self.namespace}:lease:{{{bot_id}}}"

    def fence(self, bot_id: str) -> str:
        """Counter of the bot's lease holders: each new holder gets the next fencing token."""
        return f"{self.namespace}:lease:{{{bot_id}}}:fence"

    def partition_lease(self, bot_id: str, stream: str) -> str:
        """The lease of one partition stream (by name, ``user.p3``) among the bot's
        replicas: its holder alone reads that partition. In the bot's slot."""
        return f"{self.namespace}:lease:{{{bot_id}}}:part:{stream}"

    def partition_lease_prefix(self, bot_id: str) -> str:
        """Prefix of the bot's partition leases and their fences (for its ACL pattern)."""
        return f"{self.namespace}:lease:{{{bot_id}}}:part:"

    def members(self, bot_id: str) -> str:
        """The bot's live replicas that read partitions: a sorted set, consumer name →
        the Redis time (ms) its membership lapses unless renewed."""
        return f"{self.namespace}:members:{{{bot_id}}}"

    def untagged_fence(self, bot_id: str) -> str:
        """Where releases before hash-tagged lease keys kept the fence counter (moved to
        :meth:`fence` by :func:`bus.lease.carry_fence_over`)."""
        return f"{self.namespace}:lease:{bot_id}:fence"
