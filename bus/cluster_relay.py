"""Moving entries between hash slots on a Redis Cluster, exactly once, without a script
that spans them.

On one node the outbox relay and ``dlq retry`` each move an entry in one script: append to
the target, delete from the source. A cluster refuses a script whose keys sit in two slots
(a bot's outbox is in its bot's slot, a stream in its own), so there the move takes steps,
each of which can be repeated after a crash without appending twice:

1. read what to move from the source (the relay's script in its planning mode);
2. append it to each target with a script in the *target's* slot that also records what
   it appended there (:meth:`~bus.keys.Keys.relay_cursor`: per bot, the last outbox id
   appended; :meth:`~bus.keys.Keys.retry_marker`: per dead letter, the entry it became),
   and skips what that record says is done;
3. delete it from the source.

A crash between 2 and 3 leaves the entries in the source; the next round plans them again
and step 2 appends nothing. Each target's record and its entries are written by one script,
so a failover that loses the appended entries loses the record with them, and the next
round appends them again.

A failover of the *target's* shard after step 3 would lose the entries for good (the
source no longer has them). With ``replicas`` (the deployment's ``publish_replicas``)
step 2 is followed by ``WAIT`` on the target's primary, on the connection that wrote, and
step 3 runs only once that many replicas have the entries; else
:class:`~bus.errors.BusDurabilityError` and the source keeps them for the next round. A
repeated step 2 writes its record again, so its ``WAIT`` covers the earlier append too.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from bus.errors import BusDurabilityError
from bus.keys import Keys
from bus.lease import run_script, script_sha
from bus.plain_settings import AnyBusSettings

#: KEYS: the target stream, its relay cursor. ARGV: the bot id, then per entry its outbox
#: id, its field count and its fields. Appends the entries whose outbox id is after the
#: bot's cursor, then moves the cursor; "wrongtype" (nothing written) if the target is no
#: stream. Ids compare as numbers of any length (a bot may give its outbox entries ids).
_APPEND_ONCE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then return 'wrongtype' end
local cursor = redis.call('HGET', KEYS[2], ARGV[1])
local function after(a, b)
  if not b then return true end
  local am, as = string.match(a, '^(%d+)%-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)%-(%d+)$')
  if not bm then return true end
  if #am ~= #bm then return #am > #bm end
  if am ~= bm then return am > bm end
  if #as ~= #bs then return #as > #bs end
  return as > bs
end
local i, added, last = 2, 0, nil
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  if after(id, cursor) then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 2, i + 1 + n))
    added = added + 1
    last = id
  end
  i = i + 2 + n
end
-- Written even when nothing was added (a repeated step): the connection's replication
-- offset then covers the earlier append, for the WAIT that may follow.
redis.call('HSET', KEYS[2], ARGV[1], last or cursor)
return added
"""

#: KEYS: the outbox. ARGV: the last entry moved. Deletes it and everything before it.
_TRIM = """
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
return redis.call('XDEL', KEYS[1], ARGV[1])
"""

#: KEYS: the target stream, the letter's retry marker; ARGV: seconds the marker is kept,
#: then the entry's fields. Appends once per marker: "done <id>" when the marker was there
#: (an earlier retry appended <id>), "wrongtype" when the target is no stream, else the
#: new id.
_RETRY_ONCE = """
local done = redis.call('GET', KEYS[2])
if done then
  redis.call('SET', KEYS[2], done, 'KEEPTTL')  -- see _APPEND_ONCE: covers the earlier append
  return 'done ' .. done
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then return 'wrongtype' end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[1]))
return id
"""

#: How long a retry marker is kept: far longer than any crash between two steps.
RETRY_MARKER_TTL = 7 * 24 * 3600

_ENTRY_ID = re.compile(r"\d{1,19}-\d{1,19}")


@dataclass(frozen=True, slots=True)
class Durable:
    """Replicas that must have a step's writes before the next step (0: none), and how
    long to wait for them."""

    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def of(cls, settings: AnyBusSettings) -> Durable:
        """What ``publish_replicas`` and its timeout ask of a move's steps."""
        timeout_ms = max(1, round(settings.publish_replicas_timeout * 1000))
        return cls(settings.publish_replicas, timeout_ms)


#: No replica confirmation: one node, or ``publish_replicas = 0``.
NO_WAIT = Durable()


class TargetNotAStreamError(ResponseError):
    """A target key holds something else than a stream: nothing was appended. Reads as
    Redis's own WRONGTYPE error, which is what one node's script raises."""

    def __init__(self, key: str) -> None:
        super().__init__(f"WRONGTYPE {key} is not a stream: nothing was appended to it")
        self.key = key


async def relay_planned(
    redis: Redis,
    keys: Keys,
    bot_id: str,
    targets: Sequence[str],
    reply: Any,
    *,
    durable: Durable = NO_WAIT,
) -> int:
    """Carry out a plan of the relay's script (see :data:`bus.relay_script.RELAY`): append each
    entry to its target once, then trim the outbox; how many outbox entries it covered.
    ``targets`` are the relay's KEYS (outbox, dead-letter stream, then the streams)."""
    count, last, planned = int(reply[0]), _text(reply[1]), reply[2]
    if not count:
        return 0
    appends: dict[str, list[Any]] = defaultdict(list)
    for index, outbox_id, planned_fields, named, entry_id in planned:
        fields = list(planned_fields)
        if int(index) == 2 and "origin" not in fields[::2]:
            fields += await _origin(redis, keys, _text(named), _text(entry_id))
        appends[targets[int(index) - 1]] += [outbox_id, len(fields), *fields]
    for target, args in appends.items():
        added = await run_durably(
            redis, _APPEND_ONCE, [target, keys.relay_cursor(target)], [bot_id, *args], durable
        )
        if _text(added) == "wrongtype":
            raise TargetNotAStreamError(target)
    await run_script(redis, _TRIM, [keys.outbox(bot_id)], [last])
    return count


async def run_durably(
    redis: Redis, source: str, keys: list[str], args: list[Any], durable: Durable
) -> Any:
    """:func:`~bus.lease.run_script`, followed, with ``durable.replicas``, by ``WAIT`` on
    the connection that ran it (one pipeline to the primary of ``keys[0]``); raises
    :class:`BusDurabilityError` when fewer replicas confirmed."""
    if not durable.replicas:
        return await run_script(redis, source, keys, args)
    cluster: Any = redis
    await cluster.initialize()  # at once when it knows the slots already
    node = cluster.get_node_from_key(keys[0])
    sha = script_sha(source)
    for attempt in (1, 2):
        try:
            async with cluster.pipeline(transaction=False) as pipe:
                pipe.evalsha(sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", durable.replicas, durable.timeout_ms,
                                     target_nodes=node)  # fmt: skip
                reply, acknowledged = await pipe.execute()
            break
        except NoScriptError:  # a restarted node: load it, once
            if attempt == 2:
                raise
            await redis.script_load(source)
    if int(acknowledged) < durable.replicas:
        raise BusDurabilityError(
            f"{keys[0]}: written on its primary, but only {acknowledged} of "
            f"{durable.replicas} replicas confirmed it within {durable.timeout_ms} ms "
            "(publish_replicas); the source keeps what was moved until they do",
            int(acknowledged),
        )
    return reply


async def _origin(redis: Redis, keys: Keys, stream: str, entry_id: str) -> list[str]:
    """A bot's dead letter's ``origin`` fields, as the relay's script writes them on one
    node: ``found`` (and the entry's ``source``) when ``stream`` holds ``entry_id``."""
    named = stream.startswith(keys.stream_prefix()) and _ENTRY_ID.fullmatch(entry_id)
    if named and await redis.type(stream) == "stream":
        rows: Any = await redis.xrange(stream, entry_id, entry_id)
        if rows and _text(rows[0][0]) == entry_id:
            source = dict(rows[0][1]).get("source")
            return ["origin", "found", *(["source", source] if source is not None else [])]
    return ["origin", "missing"]


async def retry_once(
    redis: Redis,
    keys: Keys,
    dlq_key: str,
    dlq_id: str,
    *,
    stream: str,
    fields: list[Any],
    durable: Durable = NO_WAIT,
) -> str:
    """``dlq retry`` on a cluster: append the letter's entry to ``stream`` once (a retry
    marker in the stream's slot), then delete the letter. The new entry's id; raises
    :class:`TargetNotAStreamError` (nothing written), and ``LookupError`` with the id an
    earlier retry of the same letter added (one at the same time, or one that stopped
    before it deleted the letter: the letter is deleted now)."""
    marker = keys.retry_marker(stream, dlq_id)
    reply = _text(
        await run_durably(
            redis, _RETRY_ONCE, [stream, marker], [RETRY_MARKER_TTL, *fields], durable
        )
    )
    if reply == "wrongtype":
        raise TargetNotAStreamError(stream)
    await redis.xdel(dlq_key, dlq_id)  # an earlier retry may have stopped before this
    if reply.startswith("done "):
        raise LookupError(reply.removeprefix("done "))
    return reply


def _text(value: Any) -> str:
    return value.decode(errors="surrogateescape") if isinstance(value, bytes) else str(value)
