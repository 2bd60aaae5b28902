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
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlunsplit

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from bus.connection import is_cluster
from bus.deployment import SCHEMES, SCHEMES_TEXT, split_url
from bus.keys import Keys
from manager.daemon.acl_rules import (
    REPLAY_SUFFIX,
    STREAMS_SUFFIX,
    USER_INFIX,
    BotUserError,
    bot_acl_rules,
    bot_id_of,
    bot_key_patterns,
    bot_state_patterns,
    bot_username,
    check_namespace,
    replay_acl_rules,
    replay_username,
    streams_acl_rules,
    streams_username,
)
from manager.daemon.redis_replicas import describe
from manager.errors import ManagerError

__all__ = [  # the rules and names are re-exported: callers need one module
    "REPLAY_SUFFIX",
    "STREAMS_SUFFIX",
    "USER_INFIX",
    "BotUserError",
    "RedisAclError",
    "bot_acl_rules",
    "bot_id_of",
    "bot_key_patterns",
    "bot_redis_url",
    "bot_state_patterns",
    "bot_username",
    "bot_users",
    "bots_base_url",
    "delete_bot_user",
    "ensure_bot_user",
    "generate_password",
    "replay_acl_rules",
    "replay_username",
    "streams_acl_rules",
    "streams_username",
]

log = structlog.get_logger("manager.daemon.redis_acl")

#: Bytes of randomness in a generated password (43 URL-safe characters).
PASSWORD_BYTES = 32

_URL_SCHEMES = SCHEMES
_CREDENTIAL_PARAMS = ("username", "password")
#: redis-py's query options naming the client's TLS identity: the manager's stays its own.
_CLIENT_CERT_PARAMS = ("ssl_certfile", "ssl_keyfile", "ssl_password")


class RedisAclError(ManagerError):
    """Redis refused an ACL command the manager sent to set up or remove a bot's user."""


def generate_password() -> str:
    """A fresh random password for a bot's user (32 random bytes, URL-safe text)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


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


async def _acl_everywhere(admin: Redis, replicas: Sequence[Redis], *args: str, doing: str) -> Any:
    """:func:`_acl` on the primary, then on each replica (ACL users are not replicated); a
    replica's refusal is logged, not raised: the primary has the user, and a failover to
    that replica would lock the bots out until the manager sets them there again."""
    result = await _acl(admin, *args, doing=doing)
    for replica in replicas:
        try:
            await _acl(replica, *args, doing=doing)
        except (RedisAclError, RedisError) as exc:
            log.warning(
                "redis_acl.replica_refused: a failover to this replica would lock the bots "
                "out; give it the primary's ACL permissions and password (masterauth users "
                "are the same on every node)",
                replica=describe(replica),
                doing=doing,
                error=str(exc),
            )
    return result


async def ensure_bot_user(
    admin: Redis,
    keys: Keys,
    bot_id: str,
    password: str,
    *,
    outbox: bool = True,
    durable: bool = False,
    replicas: Sequence[Redis] = (),
) -> str:
    """Create or replace the bot's three ACL users (:func:`bot_acl_rules`,
    :func:`streams_acl_rules`, :func:`replay_acl_rules`), all with ``password``; return the
    own-keys user's name (:func:`streams_username` and :func:`replay_username` name the
    others).

    Idempotent. The rules start with ``reset``, so a changed rule set or a new password
    replaces the old one in one atomic ``ACL SETUSER`` per user; connections the bot already
    has stay open and get the new permissions at once. The users are set on ``replicas``
    too (:mod:`.redis_replicas`). ``durable``: the publishing user may WAIT for replicas.
    """
    db = 0 if is_cluster(admin) else int(admin.connection_pool.connection_kwargs.get("db") or 0)
    users = {
        bot_username(keys.namespace, bot_id): bot_acl_rules(
            keys, bot_id, db=db, outbox=outbox, durable=durable
        ),
        streams_username(keys.namespace, bot_id): streams_acl_rules(keys, bot_id, db=db),
        replay_username(keys.namespace, bot_id): replay_acl_rules(
            keys, db=db, outbox=outbox, durable=durable
        ),
    }
    for username, rules in users.items():
        await _acl_everywhere(
            admin,
            replicas,
            "SETUSER",
            username,
            *rules,
            _password_rule(password),
            doing=f"setting up the Redis user {username} of bot {bot_id}",
        )
        log.info("redis_acl.user_ensured", user=username, bot_id=bot_id, rules=len(rules))
    return bot_username(keys.namespace, bot_id)


async def delete_bot_user(
    admin: Redis, keys: Keys, bot_id: str, *, replicas: Sequence[Redis] = ()
) -> bool:
    """Delete the bot's users (Redis also disconnects them), on ``replicas`` too; whether
    any existed on the primary."""
    names = [
        bot_username(keys.namespace, bot_id),
        streams_username(keys.namespace, bot_id),
        replay_username(keys.namespace, bot_id),
    ]
    deleted: Any = await _acl_everywhere(
        admin, replicas, "DELUSER", *names, doing=f"deleting the Redis users of bot {bot_id}"
    )
    if deleted:
        log.info("redis_acl.user_deleted", users=names, bot_id=bot_id)
    return bool(deleted)


async def bot_users(admin: Redis, keys: Keys) -> list[str]:
    """Names of the namespace's bot users (both of each bot), sorted (to drop those of
    removed bots: :func:`bot_id_of`)."""
    check_namespace(keys.namespace)
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
    parts = split_url(admin_url)
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
    manager's TLS client certificate). Works for every URL :mod:`bus.deployment` reads (for
    ``redis+sentinel://`` the credentials are the data nodes'); hosts, port, socket path,
    database and other query options are kept, and
    ``username``/``password`` query options (which redis-py also reads) are removed. Both
    values are percent-quoted, so any character is safe.
    """
    parts = split_url(admin_url)
    if parts.scheme not in _URL_SCHEMES:
        raise BotUserError(
            f"cannot make a bot URL from a {parts.scheme or 'scheme-less'}:// URL: use "
            f"{SCHEMES_TEXT}"
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
