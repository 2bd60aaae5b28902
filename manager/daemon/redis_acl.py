"""Redis ACL users per bot, allowed only the bot's keys and the commands the bus needs.

The manager holds the admin connection. Before it spawns a bot it calls
:func:`ensure_bot_user` and hands the bot :func:`bot_redis_url`, a URL carrying only that
user's name and password (and, over TLS, no client certificate of the manager's:
:func:`bots_base_url`). The bot then cannot run admin commands, read another namespace
(deployments may share one Redis by namespace), touch another bot's own state, switch
databases, run any script but the project's own (EVALSHA of their SHA1s, never EVAL), touch
other clients (no CLIENT UNBLOCK/KILL) or create, move or destroy consumer groups (the
manager creates every declared group before the bot starts)::

    password = generate_password()
    username = await ensure_bot_user(admin, keys, "greeter", password)
    base = bots_base_url(admin_url, bot_cert=None)
    env["MULTIBOT_REDIS_URL"] = bot_redis_url(base, username, password)

Users live in the server's memory: a Redis restarted without an ACL file has lost them, so
the manager ensures them again before (re)starting bots.

A bot never writes to a stream or the dead-letter stream: it appends to its own outbox
(``Keys.outbox``), which the manager relays (:mod:`bus.outbox`), so it cannot trim a stream,
set an entry id or claim another source.

Each bot has three users, one password, each with the commands of one kind of key (an ACL
user's commands reach all its key patterns alike, and Redis 6.2 has no selectors to split
them, so the split is by user and holds on every version):

- ``<ns>.bot.<id>``, its own keys: the data-structure commands on its state, lease, fence
  and run-once markers, XADD to its outbox;
- ``<ns>.bot.<id>.streams``, its group: the consumer's stream commands on its inboxes
  (``Keys.inbox``: the manager's fanout copies each routed stream's entries there, and its
  group is the only one on them; see :mod:`bus.fanout`), and GET of the backpressure flag;
- ``<ns>.bot.<id>.replay``, the history: XRANGE, XREVRANGE, XLEN and XINFO STREAM on the
  routed streams, for replays; no group command.

So no user of a bot can write, delete, expire or trim a stream, lower the flag, or read or
ack through another group's name: no group but its own is on a key it may use a group
command on. README "Security" lists what holds.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from bus.keys import Keys, group_name
from bus.lease import SCRIPTS, script_sha
from manager.errors import ManagerError

log = structlog.get_logger("manager.daemon.redis_acl")

#: Separates the namespace from the bot id in a bot's user name.
USER_INFIX = ".bot."
#: Ends the name of a bot's second user, the one of its group (in its inboxes).
STREAMS_SUFFIX = ".streams"
#: Ends the name of a bot's third user, the one reading the routed streams for replays.
REPLAY_SUFFIX = ".replay"
#: Bytes of randomness in a generated password (43 URL-safe characters).
PASSWORD_BYTES = 32

# Both names end up inside ACL glob patterns, so glob characters (* ? [ ] \) are refused.
# A bot id has no '.' either, so "<namespace>.bot.<bot id>" splits one way only.
_BOT_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]+")
_URL_SCHEMES = ("redis", "rediss", "unix")
_CREDENTIAL_PARAMS = ("username", "password")
#: redis-py's query options naming the client's TLS identity: the manager's stays its own.
_CLIENT_CERT_PARAMS = ("ssl_certfile", "ssl_keyfile", "ssl_password")


class BotUserError(ManagerError, ValueError):
    """A namespace, bot id, password or URL that cannot make a safe bot user."""


class RedisAclError(ManagerError):
    """Redis refused an ACL command the manager sent to set up or remove a bot's user."""


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
#: The manager's backpressure flag, read before publishing (bus.backpressure).
_PRESSURE_RULES: tuple[tuple[str, str], ...] = (("+get", "read the backpressure flag"),)
# The connection (redis-py's handshake, health checks, connection names).
_CONNECTION_RULES: tuple[tuple[str, str], ...] = (
    ("+auth", "authenticate (RESP2 handshake) and re-authenticate"),
    ("+hello", "the RESP3 handshake, which authenticates (HELLO 3 AUTH user password)"),
    ("+ping", "redis-py's health check on idle connections"),
    ("+client|setname", "name each connection <bot_id>-<instance> (visible to the operator)"),
    # Not CLIENT ID/UNBLOCK/KILL/LIST: a stopping reader cancels its own blocking read.
    # redis-py's Script loads a script when EVALSHA answers NOSCRIPT; loading runs nothing.
    ("+script|load", "load the project's scripts after a Redis restart (bus.lease.run_script)"),
)


def _script_rules() -> list[str]:
    """EVALSHA of exactly the project's scripts (bus.lease.SCRIPTS), by SHA1; never EVAL."""
    return [f"+evalsha|{script_sha(source)}" for source in SCRIPTS.values()]


def _check_namespace(namespace: str) -> None:
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise BotUserError(
            f"namespace {namespace!r} cannot be scoped by a Redis ACL: use letters, digits, "
            "'_', '.' and '-' only (glob characters would widen the bot's key patterns)"
        )


def _check_names(namespace: str, bot_id: str) -> None:
    _check_namespace(namespace)
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


def generate_password() -> str:
    """A fresh random password for a bot's user (32 random bytes, URL-safe text)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


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


def bot_acl_rules(keys: Keys, bot_id: str, *, db: int = 0, outbox: bool = True) -> list[str]:
    """The ``ACL SETUSER`` rules of a bot's own-keys user, without its password.

    ``reset`` comes first, so applying the rules replaces whatever the user had; then the
    user is enabled and gets no pub/sub channels. ``db`` is the only database the user may
    SELECT (the one of its URL). With ``outbox`` it may XADD to the bot's outbox (without,
    the bot publishes through its stream user: :func:`streams_acl_rules`).
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


def replay_acl_rules(keys: Keys, *, db: int = 0, outbox: bool = True) -> list[str]:
    """The ``ACL SETUSER`` rules of a bot's replay user, without its password: reading the
    routed streams, no group command (the same for every bot). Without ``outbox`` it also
    XADDs to the streams and the dead-letter stream (the bot publishes directly)."""
    direct = [f"~{keys.dead_letters()}", *(r for r, _ in _DIRECT_RULES)] if not outbox else []
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


def _password_rule(password: str) -> str:
    """The password as a SHA-256 rule: the clear text never reaches Redis."""
    if not password:
        raise BotUserError("a bot's password must not be empty: use generate_password()")
    return "#" + hashlib.sha256(password.encode()).hexdigest()


async def _acl(admin: Redis, *args: str, doing: str) -> Any:
    """Run an ACL command on the admin connection; a refusal becomes :class:`RedisAclError`."""
    try:
        # Raw ACL SETUSER: redis-py's acl_setuser() reorders rules; execute_command is untyped.
        return await admin.execute_command("ACL", *args)  # type: ignore[no-untyped-call]
    except NoPermissionError as exc:
        raise RedisAclError(
            f"Redis refused ACL {args[0]} while {doing}: the manager's own Redis user lacks "
            f"permission ({exc}). Give the manager a Redis URL whose user may run ACL "
            "commands (the default user, or one with `+acl`), or run bots without per-bot "
            "users"
        ) from exc
    except ResponseError as exc:
        raise RedisAclError(
            f"Redis rejected ACL {args[0]} while {doing}: {exc}. Per-bot users need Redis 6.2 "
            "or newer with ACLs enabled; upgrade Redis, or run bots without per-bot users"
        ) from exc


async def ensure_bot_user(
    admin: Redis, keys: Keys, bot_id: str, password: str, *, outbox: bool = True
) -> str:
    """Create or replace the bot's three ACL users (:func:`bot_acl_rules`,
    :func:`streams_acl_rules`, :func:`replay_acl_rules`), all with ``password``; return the
    own-keys user's name (:func:`streams_username` and :func:`replay_username` name the
    others).

    Idempotent. The rules start with ``reset``, so a changed rule set or a new password
    replaces the old one in one atomic ``ACL SETUSER`` per user; connections the bot already
    has stay open and get the new permissions at once.
    """
    db = int(admin.connection_pool.connection_kwargs.get("db") or 0)
    users = {
        bot_username(keys.namespace, bot_id): bot_acl_rules(keys, bot_id, db=db, outbox=outbox),
        streams_username(keys.namespace, bot_id): streams_acl_rules(keys, bot_id, db=db),
        replay_username(keys.namespace, bot_id): replay_acl_rules(keys, db=db, outbox=outbox),
    }
    for username, rules in users.items():
        await _acl(
            admin,
            "SETUSER",
            username,
            *rules,
            _password_rule(password),
            doing=f"setting up the Redis user {username} of bot {bot_id}",
        )
        log.info("redis_acl.user_ensured", user=username, bot_id=bot_id, rules=len(rules))
    return bot_username(keys.namespace, bot_id)


async def delete_bot_user(admin: Redis, keys: Keys, bot_id: str) -> bool:
    """Delete the bot's users (Redis also disconnects them); whether any existed."""
    names = [
        bot_username(keys.namespace, bot_id),
        streams_username(keys.namespace, bot_id),
        replay_username(keys.namespace, bot_id),
    ]
    deleted: Any = await _acl(
        admin, "DELUSER", *names, doing=f"deleting the Redis users of bot {bot_id}"
    )
    if deleted:
        log.info("redis_acl.user_deleted", users=names, bot_id=bot_id)
    return bool(deleted)


async def bot_users(admin: Redis, keys: Keys) -> list[str]:
    """Names of the namespace's bot users (both of each bot), sorted (to drop those of
    removed bots: :func:`bot_id_of`)."""
    _check_namespace(keys.namespace)
    names: Any = await _acl(admin, "USERS", doing=f"listing the bot users of {keys.namespace}")
    found = (n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return sorted(n for n in found if bot_id_of(keys.namespace, n) is not None)


def bots_base_url(admin_url: str, bot_cert: tuple[Path, Path] | None) -> str:
    """The URL bots' URLs are made from: ``admin_url`` without the manager's TLS client
    certificate, key and key password, with the bots' own ``(certificate, key)`` if given.

    A bot is untrusted code: it must never hold the manager's TLS identity. Without
    ``bot_cert`` bots present no certificate and log in with their ACL password alone, which
    a Redis with ``tls-auth-clients yes`` refuses (it is logged here, once).
    """
    parts = urlsplit(admin_url)
    params = [p for p in parts.query.split("&") if p]
    kept = [p for p in params if unquote(p.partition("=")[0]) not in _CLIENT_CERT_PARAMS]
    if bot_cert is not None:
        cert, key = bot_cert
        kept += [
            f"ssl_certfile={quote(str(cert), safe='/')}",
            f"ssl_keyfile={quote(str(key), safe='/')}",
        ]
    elif len(kept) < len(params):
        log.warning(
            "bots connect to Redis without a client certificate (the manager's stays its "
            "own); if Redis requires one (tls-auth-clients yes), set redis_tls.bot_cert_file "
            "and bot_key_file"
        )
    return urlunsplit(parts._replace(query="&".join(kept)))


def bot_redis_url(admin_url: str, username: str, password: str) -> str:
    """``admin_url`` with the bot's user name and password instead of the admin's.

    Give it :func:`bots_base_url`'s URL, never the manager's own (which may name the
    manager's TLS client certificate). Works for ``redis://``, ``rediss://`` and ``unix://``
    URLs; host, port, socket path, database and other query options are kept, and
    ``username``/``password`` query options (which redis-py also reads) are removed. Both
    values are percent-quoted, so any character is safe.
    """
    parts = urlsplit(admin_url)
    if parts.scheme not in _URL_SCHEMES:
        raise BotUserError(
            f"cannot make a bot URL from a {parts.scheme or 'scheme-less'}:// URL: use "
            "redis://, rediss:// or unix://"
        )
    if not username or not password:
        raise BotUserError("a bot URL needs both a user name and a password")
    host = parts.netloc.rpartition("@")[2]  # as written: keeps [::1] brackets and the port
    credentials = f"{quote(username, safe='')}:{quote(password, safe='')}"
    query = "&".join(
        param
        for param in parts.query.split("&")
        if param and unquote(param.partition("=")[0]) not in _CREDENTIAL_PARAMS
    )
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}", query=query))
