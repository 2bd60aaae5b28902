"""Which manager runs each bot placed on no host in particular.

A bot with ``hosts = [...]`` runs on the managers of those hosts. A bot without runs on
exactly one manager of the deployment at a time: the holder of its placement lease
(``<ns>:lease:{<bot>}:host``, the same fenced lease as the others, its holder a host's
name, kept by the manager only: no bot's Redis user reaches it). Every manager tries for
the free ones each round (a third of the TTL); when the manager running such a bot dies,
its leases lapse and another manager takes the bot over and starts it within the TTL
plus a round. A manager that cannot renew a lease because another holds it (it was
paused past the TTL, and another took it) stops that bot; one Redis lost (restarted
empty) it takes again, the bot undisturbed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
from redis.asyncio import Redis

from bus.keys import Keys
from bus.lease import Lease
from manager.config import BotConfig

log = structlog.get_logger("manager")


def placement_key(keys: Keys, bot_id: str) -> str:
    """The placement lease of a bot placed on no host."""
    return f"{keys.lease(bot_id)}:host"


class Placement:
    """This manager's share of the bots placed on no host (see the module)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        host: str,
        ttl: float,
        bots: Callable[[], Sequence[BotConfig]],
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.host = host
        self._ttl = ttl
        self._bots = bots
        self._leases: dict[str, Lease] = {}

    def __repr__(self) -> str:
        return f"<Placement {self.host} runs {sorted(self._leases)}>"

    @property
    def held(self) -> set[str]:
        """The unplaced bots this manager runs."""
        return set(self._leases)

    def place(self, bots: Sequence[BotConfig]) -> list[BotConfig]:
        """Of ``bots``, those this manager runs: placed on its host, or placed nowhere
        and held by it."""
        return [
            bot for bot in bots if (self.host in bot.hosts if bot.hosts else bot.id in self._leases)
        ]

    async def round(self, bots: Sequence[BotConfig] | None = None) -> bool:
        """Renew what is held, take what is free (of ``bots``, a reload's, else the
        running config's); whether the set changed."""
        unplaced = {bot.id for bot in (self._bots() if bots is None else bots) if not bot.hosts}
        changed = False
        for bot_id in sorted(set(self._leases) - unplaced):  # removed from the config
            await self._leases.pop(bot_id).release()
            changed = True
        for bot_id in sorted(unplaced):
            lease = self._leases.get(bot_id)
            if lease is not None:
                if not await lease.renew() and not await lease.try_acquire():
                    # try_acquire: a free lease (Redis restarted empty) is this manager's
                    # again; only one another manager holds means it runs the bot.
                    del self._leases[bot_id]
                    log.warning("bot placement lost: another manager runs it now",
                                bot_id=bot_id, host=self.host)  # fmt: skip
                    changed = True
                continue
            lease = Lease(self._redis, self._keys, bot_id, self.host, self._ttl,
                          key=placement_key(self._keys, bot_id))  # fmt: skip
            if await lease.try_acquire():
                self._leases[bot_id] = lease
                log.info("bot placed on this manager", bot_id=bot_id, host=self.host)
                changed = True
        return changed

    async def release_all(self) -> None:
        """Give every placement up (a clean stop, after the bots stopped)."""
        for lease in self._leases.values():
            await lease.release()
        self._leases.clear()
