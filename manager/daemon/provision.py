"""What the bots get from the manager: a Redis user each, their consumer groups, their
subscriptions recorded in the archive, a read-only archive role, and each process's spec,
environment and OS user.

The bots' passwords live in this object and, one per bot for every manager of the
deployment, in Redis (:mod:`.bot_credentials`; Redis keeps the ACL users in memory, so
after a Redis restart :meth:`Provisioner.prepare_bots` sets them again with the same
passwords).
A bot's environment is built from an allow-list (:func:`bot_environment`), never from the
manager's whole environment, which holds its secrets (API tokens given by ``token_env``).
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping, Sequence

import structlog
from redis.asyncio import Redis

from bus.archive.errors import ArchiveUnavailableError
from bus.keys import Keys
from bus.lease import carry_fence_over
from bus.settings import BusSettings
from bus.supervision import RuntimeSpec
from manager.archive.link import ArchiveLink, ensure_reader
from manager.config import BotConfig, ManagerSettings
from manager.daemon.bot_credentials import forget_password, shared_password
from manager.daemon.isolation import BotUsers
from manager.daemon.redis_acl import (
    bot_id_of,
    bot_redis_url,
    bot_username,
    bot_users,
    delete_bot_user,
    ensure_bot_user,
    generate_password,
    replay_username,
    streams_username,
)
from manager.daemon.redis_replicas import replica_clients
from manager.embedded.child_process import OsUser
from manager.supervision.bot_process import Launch
from manager.supervision.coordinator import Coordinator

log = structlog.get_logger("manager")

#: What a bot process gets of the manager's environment (besides ``LC_*``): what Python
#: needs to find itself and its modules (``PYTHONPATH``, ``PYTHONHOME``, …) and to read and
#: write text. ``HOME``, ``USER`` and ``LOGNAME`` are the bot's OS user's; everything else a
#: bot needs goes in its config's ``environment``.
PASSED_ENVIRONMENT = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSAFEPATH",
        "PYTHONNOUSERSITE",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONPYCACHEPREFIX",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONUNBUFFERED",
    }
)


def bot_environment(
    environ: Mapping[str, str], user: OsUser, own: Mapping[str, str]
) -> dict[str, str]:
    """A bot process's environment: the allowed part of ``environ``, the identity of its
    OS ``user``, and its config's ``own`` variables (which win)."""
    environment = {
        k: v for k, v in environ.items() if k in PASSED_ENVIRONMENT or k.startswith("LC_")
    }
    try:
        home = pwd.getpwuid(user.uid).pw_dir
    except KeyError:  # a uid with no passwd entry
        home = "/"
    environment.update(HOME=home, USER=user.name, LOGNAME=user.name)
    environment.update(own)
    return environment


class Provisioner:
    """Provisions the bots' Redis users, groups and archive access; builds their specs."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        admin: Redis,
        admin_url: str,
        keys: Keys,
        redis_url: str,
        archive: ArchiveLink,
        environ: Mapping[str, str],
        users: BotUsers,
    ) -> None:
        # Only the settings a reload never changes are read here (bus, supervisor timings,
        # log level); the bots come in as arguments.
        self._settings = settings
        self._admin = admin
        self._admin_url = admin_url
        self._keys = keys
        self._redis_url = redis_url
        self._archive = archive
        self._environ = dict(environ)
        self._users = users
        self._manager_user = OsUser.current()
        self._passwords: dict[str, str] = {}
        self._reader_dsn: str | None = None

    def __repr__(self) -> str:
        reader = "yes" if self._reader_dsn else "no"
        return f"<Provisioner bots={len(self._passwords)} archive_reader={reader}>"

    async def prepare_bots(
        self,
        bots: Sequence[BotConfig],
        coordinator: Coordinator,
        *,
        deployment: Sequence[BotConfig] | None = None,
    ) -> None:
        """The bots' OS users looked up (else OsUserError, before anything changes); a Redis
        user per bot (users of removed bots dropped), and the declared groups. ``bots``
        are this manager's; ``deployment`` every bot of the config, whose users stay
        (another host's manager keeps them)."""
        self._users.resolve(bots)
        wanted = {b.id for b in (bots if deployment is None else deployment)}
        listed = [
            bot_id_of(self._keys.namespace, u) for u in await bot_users(self._admin, self._keys)
        ]
        async with replica_clients(self._admin, self._admin_url) as replicas:
            for bot_id in sorted({b for b in listed if b is not None} - wanted):
                await delete_bot_user(self._admin, self._keys, bot_id, replicas=replicas)
                await forget_password(self._admin, self._keys, bot_id)
            for bot in bots:
                candidate = self._passwords.get(bot.id) or generate_password()
                self._passwords[bot.id] = await shared_password(
                    self._admin, self._keys, bot.id, candidate
                )
                await ensure_bot_user(
                    self._admin,
                    self._keys,
                    bot.id,
                    self._passwords[bot.id],
                    outbox=self._settings.supervisor.bot_outbox,
                    durable=self._settings.bus.publish_replicas > 0,
                    replicas=replicas,
                )
        for bot in bots:
            if bot.standby and await carry_fence_over(self._admin, self._keys, bot.id):
                log.info("lease fence counter moved to its hash-tagged key", bot_id=bot.id)
        created = await coordinator.ensure_groups(bots)
        await self._record_subscriptions(bots)
        log.info("bots prepared", bots=len(bots), groups_created=created)

    async def prepare_reader(self, dsn: str) -> None:
        """A read-only PostgreSQL role for the bots' replays (best effort: without it, and
        while PostgreSQL is away at start, bots replay only what Redis holds)."""
        if not self._archive.connected:
            return
        try:
            store = await self._archive.get()
            self._reader_dsn = await ensure_reader(store, dsn, generate_password())
        except Exception as exc:
            log.warning(
                "cannot create the read-only archive role for bots (needs CREATEROLE); "
                "their replays see only what Redis holds",
                error=str(exc),
            )

    async def _record_subscriptions(self, bots: Sequence[BotConfig]) -> None:
        """The declared subscriptions into the archive's event_subscriptions (best effort:
        PostgreSQL may be away; they are written again at the next start or reload)."""
        if not self._archive.connected:
            return
        try:
            store = await self._archive.get()
            for gone in set(await store.subscribers()) - {b.id for b in bots}:
                await store.upsert_subscriptions(gone, [])
            for bot in bots:
                declared = [(s.pattern, s.where) for s in bot.subscriptions]
                await store.upsert_subscriptions(bot.id, declared)
        except ArchiveUnavailableError as exc:
            log.warning("cannot record the subscriptions in PostgreSQL", error=str(exc))

    def spec(self, bot: BotConfig, index: int) -> Launch:
        """What the bot's next process gets: its spec (own Redis user), its environment and
        its OS user."""
        settings = self._settings
        username = bot_username(self._keys.namespace, bot.id)
        password = self._passwords[bot.id]
        url = bot_redis_url(self._redis_url, username, password)
        options = settings.bus_settings(url)
        streams_user = streams_username(self._keys.namespace, bot.id)
        options["streams_url"] = bot_redis_url(self._redis_url, streams_user, password)
        replay_user = replay_username(self._keys.namespace, bot.id)
        options["replay_url"] = bot_redis_url(self._redis_url, replay_user, password)
        # Its group lives in its inboxes, which the manager's fanout fills (bus.fanout).
        options["inboxes"] = True
        options["archive_dsn"] = self._reader_dsn
        # Unless the operator chose direct publishing, its Redis user may not write streams.
        options["outbox"] = settings.supervisor.bot_outbox
        # What each delivery came to, through the outbox (the relay stamps the group).
        options["delivery_records"] = settings.audit.deliveries and settings.supervisor.bot_outbox
        if bot.consumer is not None:
            options["consumer"] = bot.consumer
        spec = RuntimeSpec(
            bot_id=bot.id,
            instance=index,
            entry=bot.entry,
            bus=BusSettings.model_validate(options),
            heartbeat_interval=settings.supervisor.heartbeat_interval,
            stop_timeout=bot.stop_timeout,
            lease_ttl=settings.supervisor.lease_ttl if bot.standby else None,
            log_level=settings.log_level,
            subscriptions=[(sub.pattern, sub.where) for sub in bot.subscriptions],
        )
        user = self._users.user(bot)
        environment = bot_environment(self._environ, user or self._manager_user, bot.environment)
        return Launch(spec, environment, user)
