"""A bot that notices a user talking to several bots and says so once.

It reads every ``user.message.received`` and, per user, which bots the user wrote to within
:data:`WINDOW` seconds (by event time). When that set reaches two bots or more it publishes
``multibot.user.shared_detected`` ``{user_id, bot_ids}`` (sorted), once per user and set of
bots per window.

The state lives in Redis, not in the process: replicas of this bot share one consumer
group, so each sees only part of a user's messages, and only a shared record lets them
notice the user at all. Per user, a sorted set holds bot id → last message time; a
``SET NX`` marker per (user, bots) lets exactly one replica announce. Both expire after the
window, which bounds memory by the number of users active in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import structlog

from bus import BusClient, Event, EventType, UserMessage

log = structlog.get_logger("bots.shared_users")

#: Seconds within which messages to different bots count as the same user shared.
WINDOW = 600.0


class SharedUserDetector:
    """The subscription and handler of the shared-user detector on its bus client."""

    def __init__(self, bus: BusClient, window: float = WINDOW) -> None:
        self.bus = bus
        self.window = window
        self._ttl = max(1, math.ceil(window))
        self._log = log.bind(bot_id=bus.bot_id)

    def install(self) -> None:
        """Subscribe to every user's messages (before ``bus.run()``)."""
        self.bus.subscribe(EventType.MESSAGE_RECEIVED, self.on_message, model=UserMessage)

    def _seen_key(self, user_id: str | int) -> str:
        """Sorted set of the bots a user wrote to, scored by the time of the last message."""
        return self.bus.keys.bot_state(self.bus.bot_id, "seen", user_id)

    def _announced_key(self, user_id: str | int, bot_ids: Sequence[str]) -> str:
        """Marker of the announcement of one user and set of bots (value: the event id)."""
        return self.bus.keys.bot_state(self.bus.bot_id, "shared", user_id, ",".join(bot_ids))

    async def on_message(self, event: Event, msg: UserMessage) -> None:
        """Record which bot the user wrote to; announce a new set of two or more bots."""
        at = event.timestamp.timestamp()
        key = self._seen_key(msg.user_id)
        # One transaction, so concurrent replicas each see the other's bot once written.
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {msg.bot_id: at}, gt=True)  # never move a bot back in time
            pipe.zremrangebyscore(key, "-inf", f"({at - self.window}")
            pipe.zrange(key, 0, -1)
            pipe.expire(key, self._ttl)
            _, _, seen, _ = await pipe.execute()
        bot_ids = sorted(seen)
        if len(bot_ids) < 2 or not await self._claim(msg.user_id, bot_ids, event.id):
            return
        data = {"user_id": msg.user_id, "bot_ids": bot_ids}
        await self.bus.publish(EventType.SHARED_USER_DETECTED, data, key=str(msg.user_id))
        self._log.info("shared user detected", user_id=msg.user_id, bot_ids=bot_ids)

    async def _claim(self, user_id: str | int, bot_ids: Sequence[str], event_id: str) -> bool:
        """Whether this event announces the set: it claimed it first, or it is a redelivery
        of the event that did (which crashed before publishing, so publish again)."""
        key = self._announced_key(user_id, bot_ids)
        redis = self.bus.redis
        if await redis.set(key, event_id, nx=True, ex=self._ttl):
            return True
        return bool(await redis.get(key) == event_id)

    def __repr__(self) -> str:
        return f"<SharedUserDetector window={self.window:g}s on {self.bus!r}>"


async def main(bus: BusClient) -> None:
    """Run the shared-user detector until the bus client is stopped."""
    SharedUserDetector(bus).install()
    await bus.run()
