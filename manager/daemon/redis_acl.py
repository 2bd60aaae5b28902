"""A Redis ACL user per bot, allowed only the bot's keys and the commands the bus needs.

The manager holds the admin connection. Before it spawns a bot it calls
:func:`ensure_bot_user` and hands the bot :func:`bot_redis_url`, a URL carrying only that
user's name and password. The bot then cannot run admin commands, read another namespace
(deployments may share one Redis by namespace) or touch another bot's own state::

    password = generate_password()
    username = await ensure_bot_user(admin, keys, "greeter", password)
    env["MULTIBOT_REDIS_URL"] = bot_redis_url(admin_url, username, password)

Users live in the server's memory: a Redis restarted without an ACL file has lost them, so
the manager ensures them again before (re)starting bots.

Limits of what an ACL can say on Redis 6.2 (no selectors): key patterns cover every command
alike, so a bot that may DEL/SET its own keys may also DEL, overwrite or EXPIRE a stream of
the namespace or the dead-letter stream, and stream commands cannot be limited to the bot's
own group (it could read or ack another bot's group). EVAL lets a bot run a script that
blocks the server until an admin sends SCRIPT KILL. The user keeps other deployments and
other bots' own state out of reach; it does not make bots of one deployment distrust each
other.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from bus.keys import Keys, group_name
from manager.errors import ManagerError

log = structlog.get_logger("manager.daemon.redis_acl")

#: Separates the namespace from the bot id in a bot's user name.
USER_INFIX = ".bot."
#: Bytes of randomness in a generated password (43 URL-safe characters).
PASSWORD_BYTES = 32

# Both names end up inside ACL glob patterns, so glob characters (* ? [ ] \) are refused.
# A bot id has no '.' either, so "<namespace>.bot.<bot id>" splits one way only.
_BOT_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]+")
_URL_SCHEMES = ("redis", "rediss", "unix")
_CREDENTIAL_PARAMS = ("username", "password")


class BotUserError(ManagerError, ValueError):
    """A namespace, bot id, password or URL that cannot make a safe bot user."""


class RedisAclError(ManagerError):
    """Redis refused an ACL command the manager sent to set up or remove a bot's user."""


# Commands of a bot's user, in order (ACL rules apply left to right), each with its reason.
# Categories are used only where every command in them is checked against the key
# patterns; @read, @write, @keyspace and @fast are avoided on purpose because they hold
# SCAN, RANDOMKEY and DBSIZE (which see every key name of every namespace), MOVE and COPY
# ... DB (other databases) and, on 7.0, FUNCTION LOAD/DELETE/FLUSH. Every rule exists in
# Redis 6.2 and 7.0 alike; selectors (%R~, %W~) are 7.0-only and not used.
_COMMAND_RULES: tuple[tuple[str, str], ...] = (
    ("-@all", "start from nothing: everything below is an allow-list"),
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
    # -- the event bus (bus.publisher, bus.consumer, bus.handling, bus.dlq, bus.replay) ----
    ("+xadd", "publish (Publisher.publish/publish_many) and dead-letter (DeadLetters.add)"),
    ("+xreadgroup", "read the bot's group: new entries and its own pending ones after restart"),
    ("+xack", "ack handled, skipped and dead-lettered entries (AckBatcher)"),
    ("+xpending", "delivery counts of re-taken entries, to dead-letter poison ones"),
    ("+xautoclaim", "take over entries idle on a dead consumer of the bot's group"),
    ("+xclaim", "keep its own long-running entries from being reclaimed (JUSTID)"),
    ("+xgroup|create", "create the bot's group on each stream it reads (MKSTREAM)"),
    ("+xrange", "replay and DeadLetters.list/get"),
    ("+xlen", "DeadLetters.count"),
    # Read-only and key-checked; not called by the bus today, kept for bots' own tooling.
    ("+xgroup|createconsumer", "create a consumer explicitly (XREADGROUP also does)"),
    ("+xrevrange", "read a stream newest first (latest events)"),
    ("+xinfo|stream", "stream inspection (length, first/last entry)"),
    ("+xinfo|groups", "group inspection (pending, lag)"),
    ("+xinfo|consumers", "consumer inspection (idle consumers)"),
    # Not XDEL, XTRIM, XSETID, XGROUP DESTROY/SETID/DELCONSUMER: no bot needs them, and on
    # the shared streams they delete other bots' events or groups (DEL below still reaches
    # those keys: see the module's limits). DLQ retry and purge (XDEL, DEL on the
    # dead-letter stream) are operator actions through the manager's admin connection.
    # -- generic key commands, all checked against the key patterns ------------------------
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
    # -- scripts: Redis checks every key a script touches against these same patterns -----
    ("+eval", "atomic lease acquire/renew/release scripts on the lease and fence keys"),
    ("+evalsha", "the same scripts by hash (redis-py's Script tries EVALSHA first)"),
    ("+script|load", "redis-py's Script loads the script when EVALSHA answers NOSCRIPT"),
    ("+script|exists", "redis-py checks cached scripts before a pipeline uses them"),
    # Not SCRIPT FLUSH/KILL, FUNCTION (FUNCTION LOAD/FLUSH are in @write on 7.0), FCALL.
    # -- the connection (redis-py's handshake, health checks, the consumer's reader) ------
    ("+auth", "authenticate (RESP2 handshake) and re-authenticate"),
    ("+hello", "the RESP3 handshake, which authenticates (HELLO 3 AUTH user password)"),
    ("+ping", "redis-py's health check on idle connections"),
    ("+select", "switch to the database of the URL (redis://host/<db>)"),
    ("+client|setname", "name each connection <bot_id>-<instance> (visible to the operator)"),
    ("+client|id", "the reader connection's id, for CLIENT UNBLOCK on stop"),
    # CLIENT UNBLOCK is @admin and @dangerous; the consumer needs exactly this subcommand to
    # wake its own blocked XREADGROUP when it stops (bus.reader.Reader.stop). Redis cannot
    # limit it to the bot's own connections: a bot could wake another client's blocking read,
    # which then reads again (or, with ERROR, gets an error the consumer backs off from).
    ("+client|unblock", "wake the bot's own blocked reader on stop"),
)


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
    """The ACL user name of a bot, e.g. ``multibot.bot.greeter``."""
    _check_names(namespace, bot_id)
    return f"{namespace}{USER_INFIX}{bot_id}"


def generate_password() -> str:
    """A fresh random password for a bot's user (32 random bytes, URL-safe text)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def bot_key_patterns(keys: Keys, bot_id: str) -> list[str]:
    """The key patterns (without ``~``) a bot's user may read and write."""
    _check_names(keys.namespace, bot_id)
    return [
        # Every stream of the namespace: a bot publishes to any stream its routes name and
        # reads its group on the streams its subscriptions need.
        f"{keys.stream_prefix()}*",
        # The dead-letter stream: the consumer writes failed and malformed events there.
        keys.dead_letters(),
        # Its own run-once markers (idempotent_ttl handlers); the prefix ends in ':' so
        # bot "a" does not match the markers of bot "ab".
        f"{keys.idempotency_prefix(group_name(bot_id))}*",
        # Its own state; again ':'-terminated so "a" does not reach "ab".
        f"{keys.bot_state(bot_id)}:*",
        # Its leader lease and the fencing counter (exact keys, no glob).
        keys.lease(bot_id),
        keys.fence(bot_id),
        # The manager's backpressure flag, read before publishing (see bus.backpressure).
        keys.pressure(),
    ]


def bot_acl_rules(keys: Keys, bot_id: str) -> list[str]:
    """The ``ACL SETUSER`` rules of a bot's user, without its password.

    ``reset`` comes first, so applying the rules replaces whatever the user had; then the
    user is enabled, gets no pub/sub channels, the key patterns of
    :func:`bot_key_patterns` and the commands of ``_COMMAND_RULES`` (see each one's reason
    there). The rules work on Redis 6.2 and 7.x.
    """
    return [
        "reset",  # no passwords, keys, channels or commands: start from nothing
        "on",  # enabled (it still needs the password given with the rules)
        "resetchannels",  # the bus uses no pub/sub; 6.2's reset may allow all channels
        *(f"~{pattern}" for pattern in bot_key_patterns(keys, bot_id)),
        *(rule for rule, _ in _COMMAND_RULES),
    ]


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


async def ensure_bot_user(admin: Redis, keys: Keys, bot_id: str, password: str) -> str:
    """Create or replace the bot's ACL user with :func:`bot_acl_rules`; return its name.

    Idempotent. The rules start with ``reset``, so a changed rule set or a new password
    replaces the old one in one atomic ``ACL SETUSER``; connections the bot already has stay
    open and get the new permissions at once.
    """
    username = bot_username(keys.namespace, bot_id)
    rules = bot_acl_rules(keys, bot_id)
    await _acl(
        admin,
        "SETUSER",
        username,
        *rules,
        _password_rule(password),
        doing=f"setting up the Redis user {username} of bot {bot_id}",
    )
    log.info("redis_acl.user_ensured", user=username, bot_id=bot_id, rules=len(rules))
    return username


async def delete_bot_user(admin: Redis, keys: Keys, bot_id: str) -> bool:
    """Delete the bot's user (Redis also disconnects it); whether it existed."""
    username = bot_username(keys.namespace, bot_id)
    deleted: Any = await _acl(
        admin, "DELUSER", username, doing=f"deleting the Redis user {username} of bot {bot_id}"
    )
    if deleted:
        log.info("redis_acl.user_deleted", user=username, bot_id=bot_id)
    return bool(deleted)


async def bot_users(admin: Redis, keys: Keys) -> list[str]:
    """Names of the namespace's bot users, sorted (to drop those of removed bots)."""
    _check_namespace(keys.namespace)
    names: Any = await _acl(admin, "USERS", doing=f"listing the bot users of {keys.namespace}")
    prefix = f"{keys.namespace}{USER_INFIX}"
    found = (n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return sorted(
        n for n in found if n.startswith(prefix) and _BOT_ID_RE.fullmatch(n[len(prefix) :])
    )


def bot_redis_url(admin_url: str, username: str, password: str) -> str:
    """``admin_url`` with the bot's user name and password instead of the admin's.

    Works for ``redis://``, ``rediss://`` and ``unix://`` URLs; host, port, socket path,
    database and other query options are kept, and ``username``/``password`` query options
    (which redis-py also reads) are removed. Both values are percent-quoted, so any
    character is safe.
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
