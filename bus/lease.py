"""The leader lease of an active/standby bot: one holder at a time, each with a fencing token.

The lease is a key ``<ns>:lease:<bot>`` holding ``"<instance> <token>"`` with a TTL. The
holder renews it well before it expires; a standby takes it only once it is gone. Each new
holder gets the next token of ``<ns>:lease:<bot>:fence``, so anything the active writes
elsewhere can carry the token and a stale holder's late writes can be refused.

A holder must stop acting as active by its own deadline: the start of its last successful
renewal plus the TTL (:attr:`Lease.valid_until`). Redis counts the TTL from when it received
that renewal, which is later, so the standby cannot take over before the old holder stopped.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from bus.connection import is_cluster
from bus.held_connection import HeldConnection
from bus.keys import Keys

# KEYS[1] lease, KEYS[2] fence counter; ARGV[1] instance, ARGV[2] ttl in ms.
# Returns {1, token} when the caller holds the lease now (newly or still), else {0, value}.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local holder, token = string.match(current, '^(%S+) (%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(token)}
  end
  return {0, current}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return {1, token}
"""
# KEYS[1] lease; ARGV[1] the holder's value, ARGV[2] ttl in ms. Returns 1 if renewed, else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lease; ARGV[1] the holder's value. Returns 1 if released, 0 if not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


#: The scripts a bot runs, by name. A bot's Redis user may run exactly these (EVALSHA with
#: their SHA1), never EVAL: see ``manager.daemon.redis_acl``.
# KEYS[1] the bot's members set; ARGV[1] a consumer name, ARGV[2] its ttl in ms, ARGV[3]
# "1" to (re)join, "0" to leave. Drops the lapsed (by the server's clock, one for all
# hosts); returns the live members, sorted.
_MEMBERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(live)
return live
"""


SCRIPTS: dict[str, str] = {
    "acquire": _ACQUIRE,
    "renew": _RENEW,
    "release": _RELEASE,
    "members": _MEMBERS,
}
_SHAS = {source: hashlib.sha1(source.encode()).hexdigest() for source in SCRIPTS.values()}


def script_sha(source: str) -> str:
    """The SHA1 Redis knows ``source`` by (what EVALSHA and the ACL rule name); computed
    once per script (the relay's is kilobytes, and runs for every batch)."""
    sha = _SHAS.get(source)
    if sha is None:
        sha = _SHAS[source] = hashlib.sha1(source.encode()).hexdigest()
    return sha


async def run_script(
    redis: Redis | HeldConnection, source: str, keys: list[str], args: list[Any]
) -> Any:
    """EVALSHA ``source``, loading it first when Redis does not have it (after a restart).

    Never EVAL: a bot's user may run only the project's scripts, named by their SHA1.
    """
    sha = script_sha(source)
    try:
        return await redis.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        await redis.script_load(source)
        return await redis.evalsha(sha, len(keys), *keys, *args)


def parse_holder(value: str | None) -> tuple[str, int] | None:
    """``"<instance> <token>"`` → ``(instance, token)``; None for no or a malformed value."""
    if not value:
        return None
    instance, _, token = value.rpartition(" ")
    valid = instance and token.isascii() and token.isdigit()
    return (instance, int(token)) if valid else None


class Lease:
    """One instance's handle on its bot's leader lease."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        bot_id: str,
        instance: str,
        ttl: float,
        *,
        key: str | None = None,
    ) -> None:
        """The bot's leader lease, or with ``key`` another lease of the bot's (a
        partition's, :meth:`~bus.keys.Keys.partition_lease`), fenced by ``<key>:fence``."""
        self._redis = redis
        self._key = key or keys.lease(bot_id)
        self._fence = f"{key}:fence" if key else keys.fence(bot_id)
        self.instance = instance
        self.ttl = ttl
        #: The fencing token while held, else None.
        self.token: int | None = None
        #: Monotonic time by which a holder must have stopped acting unless renewed.
        self.valid_until = 0.0

    @property
    def held(self) -> bool:
        """Whether this instance holds the lease and its own deadline has not passed."""
        return self.token is not None and time.monotonic() < self.valid_until

    def held_until_now(self) -> bool:
        """Whether the last holding's deadline has not passed (even if a renew just found
        the lease gone): no other holder can have acted since."""
        return time.monotonic() < self.valid_until

    @property
    def _value(self) -> str:
        return f"{self.instance} {self.token}"

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it (or we still do); whether we hold it now."""
        sent = time.monotonic()
        ttl_ms = int(self.ttl * 1000)
        result: Any = await run_script(
            self._redis, _ACQUIRE, [self._key, self._fence], [self.instance, ttl_ms]
        )
        if int(result[0]) != 1:
            return False
        self.token = int(result[1])
        self.valid_until = sent + self.ttl
        return True

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if another instance holds it."""
        if self.token is None:
            return False
        sent = time.monotonic()
        renewed: Any = await run_script(
            self._redis, _RENEW, [self._key], [self._value, int(self.ttl * 1000)]
        )
        if int(renewed) != 1:
            self.token = None
            return False
        self.valid_until = sent + self.ttl
        return True

    async def release(self) -> None:
        """Give the lease up at once (a graceful stop), so a standby need not wait for its TTL."""
        if self.token is not None:
            await run_script(self._redis, _RELEASE, [self._key], [self._value])
            self.token = None

    def __repr__(self) -> str:
        state = f"held token={self.token}" if self.held else "not held"
        return f"<Lease {self._key} instance={self.instance} {state}>"


async def members(redis: Redis, keys: Keys, bot_id: str, member: str, ttl: float,
                  *, join: bool = True) -> list[str]:  # fmt: skip
    """Renew ``member``'s place among the bot's live replicas (or leave, ``join=False``);
    the live members' names, sorted."""
    live: Any = await run_script(
        redis, _MEMBERS, [keys.members(bot_id)], [member, int(ttl * 1000), "1" if join else "0"]
    )
    return [m.decode() if isinstance(m, bytes) else str(m) for m in live]


async def release_for(redis: Redis, keys: Keys, bot_id: str, instance: str) -> bool:
    """Drop ``instance``'s lease (the manager does this when that process died); whether it did.

    Compare-and-delete on the instance part: a lease another instance took meanwhile stays.
    """
    value: Any = await redis.get(keys.lease(bot_id))
    holder = parse_holder(value.decode() if isinstance(value, bytes) else value)
    if holder is None or holder[0] != instance:
        return False
    released: Any = await redis.eval(_RELEASE, 1, keys.lease(bot_id), f"{instance} {holder[1]}")
    return int(released) == 1


#: KEYS[1] the old fence counter, KEYS[2] the new one: the new one is at least the old.
_CARRY_FENCE = """
local old = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local new = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if old > new then redis.call('SET', KEYS[2], old) end
return redis.call('DEL', KEYS[1])
"""


async def carry_fence_over(redis: Redis, keys: Keys, bot_id: str) -> bool:
    """Move a fence counter from its key before hash tags (``lease:<bot>:fence``) to
    :meth:`~bus.keys.Keys.fence`, so fencing tokens never go back across an upgrade; whether
    there was one. A cluster never had the old keys (the two slots differ): nothing to do."""
    if is_cluster(redis):
        return False
    moved: Any = await redis.eval(_CARRY_FENCE, 2, keys.untagged_fence(bot_id), keys.fence(bot_id))
    return int(moved) == 1


async def holder(redis: Redis, keys: Keys, bot_id: str) -> tuple[str, int] | None:
    """Who holds the bot's lease now: ``(instance, token)``, or None."""
    value: Any = await redis.get(keys.lease(bot_id))
    return parse_holder(value.decode() if isinstance(value, bytes) else value)
