"""Redis as the manager depends on it: usable at start, and repaired after a restart.

A restarted Redis may come back empty: the archive puts back the streams it lost
(``system.redis.restored``), and the bots' ACL users (kept in Redis's memory only) and
their groups are provisioned again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError

from bus import BusClient, EventType
from bus.connection import raise_swallowed_cancel, redact
from bus.fanout import Fanout
from bus.keys import Keys, group_name
from bus.routing import Router
from bus.tls import REDIS_TLS, tls_problem
from manager.archive.link import ArchiveLink
from manager.archive.restore import restore
from manager.config import ArchiveSettings, BotConfig
from manager.daemon.redis_replicas import other_nodes
from manager.errors import ManagerError
from manager.observe.redis_info import primaries_info
from manager.supervision.group_grants import declared_streams

log = structlog.get_logger("manager")


async def check_redis(redis: Redis, url: str) -> None:
    """Fail the start with a clear error when Redis cannot be used (``redis`` is closed then)."""
    try:
        await redis.ping()
    except AuthenticationError as exc:
        await redis.aclose()
        raise ManagerError(
            f"Redis at {redact(url)} refused the credentials ({exc}): put the right user "
            "and password in redis_url (or MULTIBOT_REDIS_URL)"
        ) from None
    except (RedisError, OSError) as exc:
        await redis.aclose()
        if problem := tls_problem(exc, url, REDIS_TLS):
            raise ManagerError(
                f"{problem} (redis_url, or MULTIBOT_REDIS_URL; [redis_tls] for the embedded "
                "redis-server)"
            ) from None
        raise ManagerError(
            f"cannot reach Redis at {redact(url)} ({exc}): start it, fix redis_url (or "
            "MULTIBOT_REDIS_URL), or leave it unset to run an embedded redis-server"
        ) from None


class RedisRepair:
    """Puts back what a restarted (maybe empty) Redis lost."""

    def __init__(
        self,
        admin: Redis,
        *,
        keys: Keys,
        router: Router,
        archive: ArchiveLink,
        system_bus: BusClient,
        settings: ArchiveSettings,
        interval: float,
        bots: Callable[[], Sequence[BotConfig]],
        provision: Callable[[], Awaitable[None]],
        fanout: Fanout | None = None,
    ) -> None:
        """``system_bus`` publishes past backpressure; ``bots`` gives the running config's
        bots; ``provision`` sets their Redis users and groups again; ``interval`` is how
        often :meth:`watch_identity` asks Redis who it is."""
        self._admin = admin
        self._keys = keys
        self._router = router
        self._archive = archive
        self._system_bus = system_bus
        self._settings = settings
        self._interval = interval
        self._bots = bots
        self._provision = provision
        self._fanout = fanout
        #: The primaries' run_ids and the replicas last seen, kept across restarts of
        #: :meth:`watch_identity`: duties stopped while Redis was away (the coordinator
        #: lease ran out) and started again must still see that Redis came back new.
        self._run_ids: dict[str, str] | None = None
        self._replicas: set[tuple[str, int]] | None = None

    def __repr__(self) -> str:
        return f"<RedisRepair namespace={self._keys.namespace} interval={self._interval}>"

    async def redis_restarted(self) -> None:
        """Redis came back (restarted, maybe empty): data the archive has, ACL users (kept
        in memory only) and groups."""
        await self.restore()
        await self._provision()

    async def restore(self) -> None:
        """Put back what the archive has of streams Redis lost (see manager.archive.restore)."""
        if not self._archive.connected:
            return
        store = await self._archive.get()
        keys, router = self._keys, self._router
        groups_of: dict[str, list[str]] = {}
        for bot in self._bots():
            for stream in declared_streams(bot, router, keys):
                groups_of.setdefault(stream, []).append(group_name(bot.id))
        done = await restore(
            self._admin,
            store,
            keys,
            groups_for=lambda stream: groups_of.get(stream, []),
            hot_window_ms=int(self._settings.hot_window * 1000),
            now_ms=int(time.time() * 1000),
            fanout=self._fanout,
        )
        if done:
            await self._system_bus.publish(
                EventType.REDIS_RESTORED,
                {
                    "streams": {keys.stream_name(s): n for s, n in done.events.items()},
                    "positions": {keys.stream_name(s): p for s, p in done.positions.items()},
                    "groups": {keys.stream_name(s): g for s, g in done.groups.items()},
                    "note": "each group resumes after its recorded position ("
                    + done.describe_groups(keys.stream_name)
                    + "); events that reached Redis after the last archived entry but were "
                    "not archived before the loss are gone",
                },
            )

    async def watch_identity(self) -> None:
        """Notice a restarted Redis or a new primary (its run_id changes; on a cluster, any
        primary's) and repair what it may have lost; set the bots' users on a replica or
        cluster node that joined (ACL users are not replicated: see
        :mod:`.redis_replicas`)."""
        while True:
            raise_swallowed_cancel()
            try:
                infos = await primaries_info(self._admin, "server")
                current = {node: str(info.get("run_id")) for node, info in infos.items()}
                now_replicas = set(await other_nodes(self._admin))
                run_ids, replicas = self._run_ids, self._replicas
                if run_ids is not None and set(current.values()) - set(run_ids.values()):
                    changed = sorted(n for n, r in current.items() if run_ids.get(n) != r)
                    log.warning(
                        "Redis restarted or failed over (new run_id): checking what it lost",
                        **({"primaries": changed} if changed != [""] else {}),
                    )
                    await self.redis_restarted()
                elif replicas is not None and now_replicas - replicas:
                    log.info(
                        "a Redis replica joined: setting the bots' users on it",
                        replicas=sorted(f"{h}:{p}" for h, p in now_replicas - replicas),
                    )
                    await self._provision()
                self._run_ids, self._replicas = current, now_replicas
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot check Redis's identity", error=str(exc))
            await asyncio.sleep(self._interval)
