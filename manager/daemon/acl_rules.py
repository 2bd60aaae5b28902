"""The ACL rules of a bot's three Redis users, and their names: pure, no Redis.

Each user gets the commands of one kind of key (an ACL user's commands reach all its key
patterns alike, and Redis 6.2 has no selectors to split them): its own keys' (data commands,
XADD to its outbox), its group's (a consumer's commands on its inboxes, GET of the
backpressure flag) and its replays' (reading the routed streams). :mod:`manager.daemon.
redis_acl` applies them.
"""

from __future__ import annotations

import re

from bus.keys import Keys, group_name
from bus.lease import SCRIPTS, script_sha
from manager.errors import ManagerError

#: Separates the namespace from the bot id in a bot's user name.
USER_INFIX = ".bot."
#: Ends the name of a bot's second user, the one of its group (in its inboxes).
STREAMS_SUFFIX = ".streams"
#: Ends the name of a bot's third user, the one reading the routed streams for replays.
REPLAY_SUFFIX = ".replay"

# Both names end up inside ACL glob patterns, so glob characters (* ? [ ] \) are refused.
# A bot id has no '.' either, so "<namespace>.bot.<bot id>" splits one way only.
_BOT_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]+")


class BotUserError(ManagerError, ValueError):
    """A namespace, bot id, password or URL that cannot make a safe bot user."""


# Rules of a bot's user, in order (ACL rules apply left to right), each with its reason.
# Categories are used only where every command in them is checked against the key
# patterns; @read, @write, @keyspace and @fast are avoided on purpose because they hold
# SCAN, RANDOMKEY and DBSIZE (which see every key name of every namespace), MOVE and COPY
# ... DB (other databases) and, on 7.0, FUNCTION LOAD/DELETE/FLUSH.
_STATE_RULES: tuple[tuple[str, str], ...] = (
    # -- the bot's own state (bot_state keys, its lease and fence, its run-once markers) --
    ("+@string", "SET/GET/INCR...: run-once markers (SET NX PX, GET), lease values, counters"),
    ("+@hash", "bot state kept in hashes"),
    ("+@list", "bot state kept in lists"),
    ("+@set", "bot state kept in sets"),
    ("+@sortedset", "bot state kept in sorted sets"),
    ("+@bitmap", "bot state kept in bitmaps"),
    ("+@hyperloglog", "bot state kept in HyperLogLogs (distinct counts)"),
    ("+@geo", "bot state kept in geo sets"),
    ("+@transaction", "MULTI/EXEC/DISCARD, WATCH/UNWATCH: atomic updates of the bot's keys"),
    # The categories above hold SORT/SORT_RO (BY/GET patterns read any key on 6.2) and
    # PFDEBUG/PFSELFTEST (admin); drop them, and anything admin, before the exact adds.
    ("-@admin", "no server administration, whatever a category above holds"),
    ("-@dangerous", "no SORT, PFDEBUG, PFSELFTEST: they escape key checks or are admin"),
    ("+del", "forget a run-once marker when the handler failed; delete own state"),
    ("+unlink", "delete own state without blocking"),
    ("+exists", "check own state"),
    ("+type", "inspect own state"),
    ("+touch", "refresh own keys' access time"),
    ("+expire", "TTL of own state"),
    ("+pexpire", "lease renewal in milliseconds"),
    ("+expireat", "absolute expiry of own state"),
    ("+pexpireat", "absolute expiry of own state in milliseconds"),
    ("+ttl", "remaining TTL of own state"),
    ("+pttl", "remaining lease time in milliseconds"),
    ("+persist", "drop the TTL of own state"),
    ("+time", "the server's clock, read by the partition membership script (bus.lease)"),
)
# The event bus (bus.publisher, bus.consumer, bus.handling, bus.reclaim, bus.replay).
# Not XADD: a bot publishes to its outbox (_OUTBOX_RULES), which the manager relays.
_STREAM_RULES: tuple[tuple[str, str], ...] = (
    ("+xreadgroup", "read the bot's group: new entries and its own pending ones after restart"),
    ("+xack", "ack handled, skipped and dead-lettered entries (AckBatcher)"),
    ("+xpending", "delivery counts of re-taken entries, to dead-letter poison ones"),
    ("+xautoclaim", "take over entries idle on a dead consumer of the bot's group"),
    ("+xclaim", "keep its own long-running entries from being reclaimed (JUSTID)"),
    ("+xrange", "an entry of its inbox by id"),
    ("+xlen", "inbox length"),
    ("+xinfo|stream", "inbox inspection (length, first/last entry)"),
    ("+xinfo|groups", "whether the bot's group exists, and its position (catch_up)"),
    ("+xinfo|consumers", "consumer inspection (idle consumers)"),
    # Not XGROUP (any subcommand): the manager subscribes every declared group before the
    # bot starts and again after Redis lost them. Not XADD, XDEL, XTRIM, XSETID.
)
#: Replays and catch-up read the routed streams (bus.replay); nothing else.
_REPLAY_RULES: tuple[tuple[str, str], ...] = (
    ("+xrange", "replay: the events still in Redis, in order"),
    ("+xrevrange", "read a stream newest first (latest events)"),
    ("+xlen", "stream length"),
    ("+xinfo|stream", "stream inspection (length, first/last entry)"),
)
#: The bot's outbox: events it publishes and dead letters it writes (bus.outbox), both
#: relayed by the manager with the bot as their source.
_OUTBOX_RULES: tuple[tuple[str, str], ...] = (
    ("+xadd", "publish an event or dead-letter an entry, through the outbox"),
)
#: Publishing with ``publish_replicas``: confirm the write on replicas.
_DURABLE_RULES: tuple[tuple[str, str], ...] = (
    ("+wait", "confirm a publish on replicas (publish_replicas); blocks only its connection"),
)
#: The manager's backpressure flag, read before publishing (bus.backpressure).
_PRESSURE_RULES: tuple[tuple[str, str], ...] = (("+get", "read the backpressure flag"),)
# The connection (redis-py's handshake, health checks, connection names).
_CONNECTION_RULES: tuple[tuple[str, str], ...] = (
    ("+auth", "authenticate (RESP2 handshake) and re-authenticate"),
    ("+hello", "the RESP3 handshake, which authenticates (HELLO 3 AUTH user password)"),
    ("+ping", "redis-py's health check on idle connections"),
    ("+client|setname", "name each connection <bot_id>-<instance> (visible to the operator)"),
    # A Redis Cluster client learns the slot map and the commands' key positions; both
    # are the same for every user and name no key. A single node refuses CLUSTER SLOTS.
    ("+cluster|slots", "a cluster client's slot map: which node serves which keys"),
    ("+cluster|shards", "a cluster client's slot map (newer redis-py)"),
    ("+command", "a cluster client's table of where each command's keys are"),
    # Not CLIENT ID/UNBLOCK/KILL/LIST: a stopping reader cancels its own blocking read.
    # redis-py's Script loads a script when EVALSHA answers NOSCRIPT; loading runs nothing.
    ("+script|load", "load the project's scripts after a Redis restart (bus.lease.run_script)"),
)


def _script_rules() -> list[str]:
    """EVALSHA of exactly the project's scripts (bus.lease.SCRIPTS), by SHA1; never EVAL."""
    return [f"+evalsha|{script_sha(source)}" for source in SCRIPTS.values()]


def check_namespace(namespace: str) -> None:
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise BotUserError(
            f"namespace {namespace!r} cannot be scoped by a Redis ACL: use letters, digits, "
            "'_', '.' and '-' only (glob characters would widen the bot's key patterns)"
        )


def _check_names(namespace: str, bot_id: str) -> None:
    check_namespace(namespace)
    if not _BOT_ID_RE.fullmatch(bot_id):
        raise BotUserError(
            f"bot id {bot_id!r} cannot be scoped by a Redis ACL: use letters, digits, '_' "
            "and '-' only (glob characters would widen its key patterns, and a '.' would "
            "make its user name ambiguous)"
        )


def bot_username(namespace: str, bot_id: str) -> str:
    """The ACL user name of a bot's own keys, e.g. ``multibot.bot.greeter``."""
    _check_names(namespace, bot_id)
    return f"{namespace}{USER_INFIX}{bot_id}"


def streams_username(namespace: str, bot_id: str) -> str:
    """The ACL user name of a bot's stream commands, e.g. ``multibot.bot.greeter.streams``."""
    return f"{bot_username(namespace, bot_id)}{STREAMS_SUFFIX}"


def replay_username(namespace: str, bot_id: str) -> str:
    """The ACL user name of a bot's replays, e.g. ``multibot.bot.greeter.replay``."""
    return f"{bot_username(namespace, bot_id)}{REPLAY_SUFFIX}"


def bot_id_of(namespace: str, username: str) -> str | None:
    """The bot id in any user name of a bot of ``namespace``; None: not one."""
    prefix = f"{namespace}{USER_INFIX}"
    if not username.startswith(prefix):
        return None
    bot_id = username[len(prefix) :].removesuffix(STREAMS_SUFFIX).removesuffix(REPLAY_SUFFIX)
    return bot_id if _BOT_ID_RE.fullmatch(bot_id) else None


def bot_state_patterns(keys: Keys, bot_id: str) -> list[str]:
    """The key patterns (without ``~``) of the bot's own keys."""
    _check_names(keys.namespace, bot_id)
    return [
        # Its own run-once markers (idempotent_ttl handlers); the prefix ends in ':' so
        # bot "a" does not match the markers of bot "ab".
        f"{keys.idempotency_prefix(group_name(bot_id))}*",
        # Its own state; again ':'-terminated so "a" does not reach "ab".
        f"{keys.bot_state(bot_id)}:*",
        # Its leader lease and the fencing counter (exact keys, no glob).
        keys.lease(bot_id),
        keys.fence(bot_id),
        # Its partition leases (and their fences) and its replicas' membership set.
        f"{keys.partition_lease_prefix(bot_id)}*",
        keys.members(bot_id),
    ]


def bot_key_patterns(keys: Keys, bot_id: str) -> list[str]:
    """Every key pattern (without ``~``) any of a bot's users reaches."""
    return [
        *bot_state_patterns(keys, bot_id),
        keys.outbox(bot_id),
        *streams_patterns(keys, bot_id),
        *replay_patterns(keys),
    ]


def streams_patterns(keys: Keys, bot_id: str) -> list[str]:
    """The key patterns of a bot's stream user: its group's inboxes (one per stream its
    subscriptions read) and the backpressure flag."""
    _check_names(keys.namespace, bot_id)
    return [f"{keys.inbox_prefix(group_name(bot_id))}*", keys.pressure()]


def replay_patterns(keys: Keys) -> list[str]:
    """The key patterns of a bot's replay user: every routed stream of the namespace."""
    return [f"{keys.stream_prefix()}*"]


#: What a bot's replay user gets when the bot publishes to the streams itself
#: (``outbox=False``): the streams' XADD, and the dead-letter stream's.
_DIRECT_RULES: tuple[tuple[str, str], ...] = (
    ("+xadd", "publish (Publisher.publish/publish_many) and dead-letter, directly"),
)


def _base_rules() -> list[str]:
    return [
        "reset",  # no passwords, keys, channels or commands: start from nothing
        "on",  # enabled (it still needs the password given with the rules)
        "resetchannels",  # the bus uses no pub/sub; 6.2's reset may allow all channels
        "-@all",  # everything below is an allow-list
    ]


def bot_acl_rules(
    keys: Keys, bot_id: str, *, db: int = 0, outbox: bool = True, durable: bool = False
) -> list[str]:
    """The ``ACL SETUSER`` rules of a bot's own-keys user, without its password.

    ``reset`` comes first, so applying the rules replaces whatever the user had; then the
    user is enabled and gets no pub/sub channels. ``db`` is the only database the user may
    SELECT (the one of its URL). With ``outbox`` it may XADD to the bot's outbox (without,
    the bot publishes through its replay user: :func:`replay_acl_rules`). With ``durable``
    (``publish_replicas`` > 0) it may WAIT for replicas after a publish.
    """
    # The state rules end in -@admin -@dangerous, which on 6.2 would also drop the exact
    # adds of CLIENT SETNAME and SCRIPT LOAD: those come after them.
    return [
        *_base_rules(),
        *(rule for rule, _ in _STATE_RULES),
        *(rule for rule, _ in _CONNECTION_RULES),
        f"+select|{int(db)}",  # its URL's database only (redis-py SELECTs it on connect)
        *_script_rules(),
        *(f"~{pattern}" for pattern in bot_state_patterns(keys, bot_id)),
        *([f"~{keys.outbox(bot_id)}", *(rule for rule, _ in _OUTBOX_RULES)] if outbox else []),
        *([rule for rule, _ in _DURABLE_RULES] if durable and outbox else []),
    ]


def streams_acl_rules(keys: Keys, bot_id: str, *, db: int = 0) -> list[str]:
    """The ``ACL SETUSER`` rules of a bot's stream user, without its password: a consumer's
    stream commands on its group's inboxes and GET on the backpressure flag, nothing that
    writes, deletes or expires a key."""
    return [
        *_base_rules(),
        *_connection_rules(db),
        *(f"~{pattern}" for pattern in streams_patterns(keys, bot_id)),
        *(rule for rule, _ in _STREAM_RULES + _PRESSURE_RULES),
    ]


def replay_acl_rules(
    keys: Keys, *, db: int = 0, outbox: bool = True, durable: bool = False
) -> list[str]:
    """The ``ACL SETUSER`` rules of a bot's replay user, without its password: reading the
    routed streams, no group command (the same for every bot). Without ``outbox`` it also
    XADDs to the streams and the dead-letter stream (the bot publishes directly), and WAITs
    for replicas with ``durable``."""
    direct = [f"~{keys.dead_letters()}", *(r for r, _ in _DIRECT_RULES)] if not outbox else []
    if durable and not outbox:
        direct += [rule for rule, _ in _DURABLE_RULES]
    return [
        *_base_rules(),
        *_connection_rules(db),
        *(f"~{pattern}" for pattern in replay_patterns(keys)),
        *(rule for rule, _ in _REPLAY_RULES),
        *direct,
    ]


def _connection_rules(db: int) -> list[str]:
    connection = [rule for rule, _ in _CONNECTION_RULES if not rule.startswith("+script")]
    return [*connection, f"+select|{int(db)}"]
