"""Consumer groups the manager creates on a bot's behalf, when the bot's consumer asks.

A bot's Redis user may not create groups: it could create them under any name and at any
id. The manager creates the group of every subscription a bot's config declares before the
bot starts; a bot that subscribes in code to streams its config does not name, or whose
group Redis lost, asks for it on the status pipe (``groups <start id> <stream>…``). The
manager then subscribes it (its inbox of the stream: :mod:`bus.fanout`), but only under the
bot's own group name, only on routed streams (and, when the config declares subscriptions,
only on the streams they read), and only at ``$`` or ``0``, never at an id the bot chose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from redis.asyncio import Redis

from bus.fanout import Fanout
from bus.keys import Keys, group_name
from bus.patterns import Pattern
from bus.routing import Router
from bus.wire import readable
from manager.config import BotConfig

log = structlog.get_logger("manager.supervision.group_grants")
#: Where a requested group may start: at new entries, or at the start of the stream.
START_IDS = ("$", "0")


def declared_streams(bot: BotConfig, router: Router, keys: Keys) -> list[str]:
    """The stream keys the bot's declared subscriptions read."""
    names = {s for sub in bot.subscriptions for s in router.streams_for(Pattern(sub.pattern))}
    return sorted(keys.stream(name) for name in names)


class GroupGrants:
    """Checks a bot's request for its groups and creates those it may have."""

    def __init__(self, redis: Redis, keys: Keys, router: Router, fanout: Fanout) -> None:
        self._fanout = fanout
        self._redis = redis
        self._keys = keys
        self._router = router
        self._granting: set[str] = set()

    def request(
        self,
        slot: str,
        bot: BotConfig,
        streams: Sequence[str],
        start_id: str,
        tg: asyncio.TaskGroup,
    ) -> None:
        """Grant a bot process's request in ``tg``: one request per slot at a time, so a bot
        flooding its status pipe with requests costs Redis nothing more. A failure is
        logged; the bot asks again."""
        if slot in self._granting:
            return
        self._granting.add(slot)

        async def grant() -> None:
            try:
                await self.grant(bot, streams, start_id)
            except Exception as exc:
                log.warning(
                    "could not create a bot's consumer group; it will ask again",
                    bot_id=bot.id,
                    error=str(exc),
                )
            finally:
                self._granting.discard(slot)

        tg.create_task(grant())

    def refusal(self, bot: BotConfig, stream: str, start_id: str) -> str | None:
        """Why the bot may not have its group on ``stream`` at ``start_id``, or None."""
        if start_id not in START_IDS:
            return f"start id {readable(start_id)!r} is neither '$' nor '0'"
        routed = {self._keys.stream(name) for name in self._router.streams()}
        if stream not in routed:
            return "not a stream of the routing table"
        if bot.subscriptions and stream not in declared_streams(bot, self._router, self._keys):
            return "not a stream the bot's declared subscriptions read"
        return None

    async def grant(self, bot: BotConfig, streams: Sequence[str], start_id: str) -> list[str]:
        """Create the bot's group on each allowed stream (idempotent); the streams granted."""
        group = group_name(bot.id)
        granted: list[str] = []
        for stream in dict.fromkeys(streams):
            reason = self.refusal(bot, stream, start_id)
            if reason is not None:
                log.warning(
                    "refused a bot's request for a consumer group",
                    bot_id=bot.id,
                    stream=readable(stream),
                    reason=reason,
                )
                continue
            if await self._fanout.subscribe(stream, group, start_id):
                log.info(
                    "consumer group created at the bot's request",
                    bot_id=bot.id,
                    group=group,
                    stream=stream,
                    start_id=start_id,
                )
            granted.append(stream)
        return granted
