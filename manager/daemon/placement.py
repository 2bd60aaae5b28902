"""Which manager runs which replicas of each bot.

A bot placed on one host (``hosts = ["worker-1"]``) runs all its replicas on that host's
manager. Any other bot is spread: placed nowhere (``hosts`` unset: any manager) or on
several hosts (``hosts = ["a", "b"]``: the managers of those), each of its replicas runs
on exactly one such manager at a time, the holder of that replica's placement lease
(``<ns>:lease:{<bot>}:host:<index>``, the same fenced lease as the others, its holder a
host's name, kept by the managers only: no bot's Redis user reaches it).

Every round (a third of the TTL) each manager renews what it holds and evens the spread
out: its share of a bot is ``ceil(replicas / live eligible managers)``; below its share it
takes free replicas, lowest index first; above it (a manager joined) it gives one back per
round, the highest, for the newcomer to take. When a manager dies its leases lapse and the
others take its replicas over and start them within the TTL plus a round. A replica keeps
its index, so its consumer name (``<bot>-<index>``) and its pending entries go with it. A
manager that cannot renew a lease because another holds it (it was paused past the TTL)
stops that replica; one Redis lost (restarted empty) it takes again, the replica
undisturbed.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

import structlog
from redis.asyncio import Redis

from bus.keys import Keys
from bus.lease import Lease
from manager.config import BotConfig

log = structlog.get_logger("manager")

#: The live managers' hosts (this one's among them).
LiveHosts = Callable[[], Awaitable[set[str]]]


def placement_key(keys: Keys, bot_id: str, index: int) -> str:
    """The placement lease of one replica of a spread bot."""
    return f"{keys.lease(bot_id)}:host:{index}"


def spread(bot: BotConfig) -> bool:
    """Whether the bot's replicas are shared out among managers (not pinned to one host)."""
    return not bot.hosts or len(bot.hosts) > 1


class Placement:
    """This manager's share of the spread bots' replicas (see the module)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        host: str,
        ttl: float,
        bots: Callable[[], Sequence[BotConfig]],
        *,
        live_hosts: LiveHosts | None = None,
    ) -> None:
        """``bots``: the running config's; ``live_hosts``: the live managers' hosts (unset:
        this one alone)."""
        self._redis = redis
        self._keys = keys
        self.host = host
        self._ttl = ttl
        self._bots = bots
        self._live_hosts = live_hosts
        self._leases: dict[tuple[str, int], Lease] = {}

    def __repr__(self) -> str:
        return f"<Placement {self.host} runs {sorted(self._leases)}>"

    @property
    def held(self) -> set[str]:
        """The spread bots this manager runs a replica of."""
        return {bot_id for bot_id, _ in self._leases}

    def indices(self, bot: BotConfig) -> list[int]:
        """The replicas of ``bot`` this manager runs."""
        if not spread(bot):
            return list(range(bot.replicas)) if bot.hosts == [self.host] else []
        return sorted(i for b, i in self._leases if b == bot.id)

    def place(self, bots: Sequence[BotConfig]) -> list[BotConfig]:
        """Of ``bots``, those this manager runs a replica of."""
        return [bot for bot in bots if self.indices(bot)]

    def eligible(self, bot: BotConfig) -> bool:
        """Whether this manager may run replicas of ``bot``."""
        return not bot.hosts or self.host in bot.hosts

    async def round(self, bots: Sequence[BotConfig] | None = None) -> bool:
        """Renew what is held, even the spread out (of ``bots``, a reload's, else the
        running config's); whether this manager's replicas changed."""
        wanted = {b.id: b for b in (self._bots() if bots is None else bots)}
        wanted = {i: b for i, b in wanted.items() if spread(b) and self.eligible(b)}
        changed = False
        for key in sorted(self._leases):  # removed from the config, or replicas lowered
            bot = wanted.get(key[0])
            if bot is None or key[1] >= bot.replicas:
                await self._leases.pop(key).release()
                changed = True
        live = await self._live_hosts() if self._live_hosts is not None and wanted else set()
        for bot in wanted.values():
            changed |= await self._renew(bot)
            changed |= await self._balance(bot, live | {self.host})
        return changed

    async def _renew(self, bot: BotConfig) -> bool:
        changed = False
        for key in sorted(k for k in self._leases if k[0] == bot.id):
            lease = self._leases[key]
            if await lease.renew() or await lease.try_acquire():
                # try_acquire: a free lease (Redis restarted empty) is this manager's again;
                # only one another manager holds means it runs the replica now.
                continue
            del self._leases[key]
            log.warning("replica placement lost: another manager runs it now",
                        bot_id=bot.id, instance=key[1], host=self.host)  # fmt: skip
            changed = True
        return changed

    async def _balance(self, bot: BotConfig, live: set[str]) -> bool:
        hosts = len(live if not bot.hosts else live & set(bot.hosts)) or 1
        share = math.ceil(bot.replicas / hosts)
        mine = self.indices(bot)
        if len(mine) > share:  # a manager joined: give one back for it to take
            key = (bot.id, mine[-1])
            await self._leases.pop(key).release()
            log.info("replica given back to spread the bot over the managers",
                     bot_id=bot.id, instance=key[1], host=self.host, share=share)  # fmt: skip
            return True
        changed = False
        for index in range(bot.replicas):
            if len(self.indices(bot)) >= share:
                break
            if (bot.id, index) in self._leases:
                continue
            lease = Lease(self._redis, self._keys, bot.id, self.host, self._ttl,
                          key=placement_key(self._keys, bot.id, index))  # fmt: skip
            if await lease.try_acquire():
                self._leases[(bot.id, index)] = lease
                log.info("replica placed on this manager", bot_id=bot.id, instance=index,
                         host=self.host)  # fmt: skip
                changed = True
        return changed

    async def release_all(self) -> None:
        """Give every placement up (a clean stop, after the bots stopped)."""
        for lease in self._leases.values():
            await lease.release()
        self._leases.clear()
