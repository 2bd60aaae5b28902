"""The managers of one deployment, as each sees the others: who runs, where, which bots.

Every manager writes its entry in ``<ns>:hosts`` (a hash, host → JSON) each interval: its
pid, version, the bots it runs and the Redis server's time of the write. An entry not
rewritten for three intervals is a manager that is gone; one gone for a day is deleted.
``multibot status`` and the API show the list from any host, with the coordinator lease's
holder; a manager refuses to start a bot placed on its host alone that another live host
already runs (two managers given one host name). The live managers count in the spread
of the bots' replicas (:mod:`.placement`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from bus.keys import Keys
from bus.lease import run_script
from manager import __version__

log = structlog.get_logger("manager")

#: Intervals without a write after which a manager counts as gone.
GONE_AFTER = 3
#: Seconds after which a gone manager's entry is deleted (it died, and nobody started it
#: again): listed as gone for a day, then no more.
FORGET_AFTER = 24 * 3600.0

#: KEYS: the hosts hash. ARGV: a host, the entry read. Deletes the entry if it is still
#: that one (its manager did not come back meanwhile); 1 if deleted.
_FORGET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def hosts_key(keys: Keys) -> str:
    """The hash of the deployment's managers."""
    return f"{keys.namespace}:hosts"


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One manager, as its last write says."""

    host: str
    pid: int
    version: str
    bots: tuple[str, ...]
    #: The replicas (instance indices) it runs of each of its bots.
    replicas: dict[str, list[int]]
    #: Seconds since its last write (by the Redis server's clock).
    age: float
    live: bool


async def _now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class HostRegistry:
    """This manager's entry, kept fresh, and the others' as read."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        host: str,
        interval: float,
        bots: Callable[[], Mapping[str, Sequence[int]]],
        *,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self._redis = redis
        self._forget_after = forget_after
        self._keys = keys
        self.host = host
        self._interval = interval
        self._bots = bots

    def __repr__(self) -> str:
        return f"<HostRegistry {self.host}>"

    async def write(self) -> None:
        """Write this manager's entry now."""
        running = self._bots()
        entry = {
            "pid": os.getpid(),
            "version": __version__,
            "bots": sorted(running),
            "replicas": {bot: sorted(indices) for bot, indices in sorted(running.items())},
            "at": await _now_ms(self._redis),
        }
        await self._redis.hset(hosts_key(self._keys), self.host, orjson.dumps(entry))

    async def run(self) -> None:
        """Write every interval until cancelled (a failed write is logged)."""
        while True:
            try:
                await self.write()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot write this manager's entry", error=str(exc))
            await asyncio.sleep(self._interval)

    async def entries(self) -> list[HostEntry]:
        """Every manager's entry, this one's first, then by host."""
        raw: Any = await self._redis.hgetall(hosts_key(self._keys))
        now = await _now_ms(self._redis)
        found = []
        for host, value in raw.items():
            try:
                entry = orjson.loads(value)
                age = max(0.0, (now - int(entry["at"])) / 1000)
                if age >= self._forget_after:
                    await self._forget(host, value, age)
                    continue
                found.append(
                    HostEntry(
                        host=host.decode() if isinstance(host, bytes) else str(host),
                        pid=int(entry["pid"]),
                        version=str(entry["version"]),
                        bots=tuple(str(b) for b in entry["bots"]),
                        replicas={
                            str(b): [int(i) for i in indices]
                            for b, indices in dict(entry.get("replicas", {})).items()
                        },
                        age=round(age, 1),
                        live=age < self._interval * GONE_AFTER,
                    )
                )
            except (ValueError, KeyError, TypeError):  # not ours: a hand-written value
                continue
        return sorted(found, key=lambda e: (e.host != self.host, e.host))

    async def _forget(self, host: Any, value: Any, age: float) -> None:
        """Delete a manager's entry gone for ``forget_after``, unless it was just rewritten."""
        if await run_script(self._redis, _FORGET, [hosts_key(self._keys)], [host, value]):
            name = host.decode() if isinstance(host, bytes) else str(host)
            log.info("forgot a manager gone for long", host=name, gone_s=round(age))

    async def live_hosts(self) -> set[str]:
        """The hosts of the managers heard from lately (this one's among them)."""
        return {e.host for e in await self.entries() if e.live} | {self.host}

    async def taken_elsewhere(self, bots: Iterable[str]) -> dict[str, str]:
        """Of ``bots``, those a live manager on another host runs: bot → host."""
        wanted = set(bots)
        taken = {}
        for entry in await self.entries():
            if entry.live and entry.host != self.host:
                taken.update(dict.fromkeys(wanted & set(entry.bots), entry.host))
        return taken

    async def leave(self) -> None:
        """Delete this manager's entry (a clean stop)."""
        await self._redis.hdel(hosts_key(self._keys), self.host)
