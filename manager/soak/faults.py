"""The faults the soak injects, one coroutine each: ``inject(ctx, hold) -> end time``.

Each returns the wall time at which the fault itself was over: at once for a kill (what
follows is recovery: the manager restarting Redis, PostgreSQL or a bot; the soak, as
systemd, restarting the manager), after ``hold`` seconds for a condition held (a pause, a
low ``maxmemory``, a read-only or "full" database). They act from outside, as an operator's
accident would: signals to the processes, admin commands to Redis and PostgreSQL.

- ``redis-kill``: SIGKILL the embedded redis-server (its pid from ``INFO server``); the
  manager restarts it, and it replays its AOF. Whether Redis was holding AOF writes back
  (an fsync still running under ``appendfsync everysec``) is read just before.
- ``redis-pause``: ``CLIENT PAUSE <hold> ALL``.
- ``redis-oom``: ``CONFIG SET maxmemory`` to 1 MiB above ``used_memory``, then back.
- ``pg-stop``: SIGINT to the postmaster (a fast shutdown); the manager starts it again.
- ``pg-readonly``: ``ALTER DATABASE … SET default_transaction_read_only = on`` and end the
  other sessions; after ``hold``, reset it and end them again (their sessions kept it).
- ``pg-diskfull``: a row trigger on ``events`` raising SQLSTATE 53100 (disk full).
- ``bot-kill``: SIGKILL a random soak bot process, twice in ``hold``.
- ``manager-kill``: SIGKILL the manager, then its remaining processes, start it again.
- ``hung-handler``: publish ``soak.hang`` events; each soak group should dead-letter them
  with reason ``timeout``.
- ``hostile``: :mod:`manager.soak.hostile`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog
from redis.asyncio import Redis

from bus import BusClient
from bus.keys import Keys
from manager.soak.bot import HANG
from manager.soak.hostile import HostileEntry, write_hostile
from manager.soak.observe import MemorySampler
from manager.soak.process import ManagerKeeper
from manager.soak.reconcile import Kill, RedisKill
from manager.status import InstanceState

log = structlog.get_logger("manager.soak")

#: Every fault, in the order ``all`` runs them.
FAULTS = (
    "redis-kill", "redis-pause", "redis-oom", "pg-stop", "pg-readonly", "pg-diskfull",
    "bot-kill", "manager-kill", "hung-handler", "hostile",
)  # fmt: skip
HANGS_PER_INJECTION = 2
_DISKFULL_FN = "soak_disk_full"
_DISKFULL_TRIGGER = "soak_disk_full"


@dataclass
class FaultContext:
    """What the faults act on, and what they record for the reconciliation."""

    keeper: ManagerKeeper
    redis: Redis
    dsn: str | None
    stream: str
    keys: Keys
    publisher: BusClient
    sampler: MemorySampler
    soak_bots: tuple[str, ...]
    kills: list[Kill] = field(default_factory=list)
    redis_kills: list[RedisKill] = field(default_factory=list)
    hostile: list[HostileEntry] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<FaultContext kills={len(self.kills)} hangs={len(self.hangs)}>"

    @property
    def pgdata(self) -> Path:
        """The embedded PostgreSQL's cluster."""
        return self.keeper.work / "data" / "postgres" / "pgdata"


Inject = Callable[[FaultContext, float], Awaitable[float]]


async def redis_kill(ctx: FaultContext, hold: float) -> float:
    """SIGKILL the embedded redis-server, noting whether it held AOF writes back."""
    info: Any = await ctx.redis.info("server")
    fsync: Any = await ctx.redis.config_get("appendfsync")
    persistence: Any = await ctx.redis.info("persistence")
    os.kill(int(info["process_id"]), signal.SIGKILL)
    at = time.time()
    # Under everysec Redis postpones its AOF writes while a background fsync runs, and
    # answers meanwhile; under always it writes and syncs before it answers.
    held = fsync.get("appendfsync") == "everysec" and persistence.get("aof_pending_bio_fsync")
    ctx.redis_kills.append(RedisKill(at, bool(held)))
    return at


async def redis_pause(ctx: FaultContext, hold: float) -> float:
    """Pause every client for ``hold`` seconds."""
    pause = ("CLIENT", "PAUSE", int(hold * 1000), "ALL")  # redis-py's client_pause lacks ALL
    await ctx.redis.execute_command(*pause)  # type: ignore[no-untyped-call]
    await asyncio.sleep(hold)
    return time.time()


async def redis_oom(ctx: FaultContext, hold: float) -> float:
    """``maxmemory`` just above what Redis uses, for ``hold`` seconds."""
    before: Any = await ctx.redis.config_get("maxmemory")
    info: Any = await ctx.redis.info("memory")
    low = int(info["used_memory"]) + (1 << 20)
    start = time.time()
    await ctx.redis.config_set("maxmemory", low)
    try:
        await asyncio.sleep(hold)
    finally:
        await ctx.redis.config_set("maxmemory", before.get("maxmemory", "0"))
        ctx.sampler.overrides.append((start, time.time() + 1.0, low))
    return time.time()


async def pg_stop(ctx: FaultContext, hold: float) -> float:
    """A fast shutdown of the embedded PostgreSQL (the manager starts it again)."""
    pid = int((ctx.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    return time.time()


async def _admin(ctx: FaultContext) -> Any:
    if ctx.dsn is None:
        raise RuntimeError("no PostgreSQL to act on")
    conn = await asyncpg.connect(ctx.dsn, timeout=30)
    await conn.execute("SET default_transaction_read_only = off")
    return conn


async def _end_other_sessions(conn: Any) -> None:
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


async def pg_readonly(ctx: FaultContext, hold: float) -> float:
    """The archive database read-only for ``hold`` seconds."""
    conn = await _admin(ctx)
    try:
        await conn.execute(
            'ALTER DATABASE "%s" SET default_transaction_read_only = on' % await _db(conn)
        )
        await _end_other_sessions(conn)
        await asyncio.sleep(hold)
        await conn.execute(
            'ALTER DATABASE "%s" RESET default_transaction_read_only' % await _db(conn)
        )
        await _end_other_sessions(conn)
    finally:
        await conn.close()
    return time.time()


async def _db(conn: Any) -> str:
    name: str = await conn.fetchval("SELECT current_database()")
    return name.replace('"', '""')


async def pg_diskfull(ctx: FaultContext, hold: float) -> float:
    """Every insert into ``events`` fails with SQLSTATE 53100 for ``hold`` seconds."""
    conn = await _admin(ctx)
    try:
        # $$-quoted body: RAISE with the disk-full SQLSTATE; no parameters, returns nothing.
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION {_DISKFULL_FN}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device (soak)' "
            "USING ERRCODE = '53100'; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {_DISKFULL_TRIGGER} BEFORE INSERT ON events "
            f"FOR EACH ROW EXECUTE FUNCTION {_DISKFULL_FN}()"
        )
        await asyncio.sleep(hold)
    finally:
        await conn.execute(f"DROP TRIGGER IF EXISTS {_DISKFULL_TRIGGER} ON events")
        await conn.close()
    return time.time()


async def soak_pids(ctx: FaultContext) -> list[int]:
    """Pids of the running soak bot processes."""
    if ctx.keeper.manager is None:
        return []
    status = await ctx.keeper.manager.status()
    return [
        i.pid
        for b in status.bots
        if b.id in ctx.soak_bots
        for i in b.instances
        if i.pid and i.state is InstanceState.RUNNING
    ]


async def bot_kill(ctx: FaultContext, hold: float) -> float:
    """SIGKILL a random running soak bot process, twice, ``hold / 2`` apart."""
    for round_ in range(2):
        pids = await soak_pids(ctx)
        if pids:
            victim = random.choice(pids)
            os.kill(victim, signal.SIGKILL)
            ctx.kills.append(Kill(victim, time.time(), "bot-kill"))  # handlings before: explained
        if round_ == 0:
            await asyncio.sleep(hold / 2)
    return time.time()


async def manager_kill(ctx: FaultContext, hold: float) -> float:
    """SIGKILL the manager and its tree; start it again (the end is the kill)."""
    begun = time.time()
    dead_at, tree = await ctx.keeper.kill_and_restart()
    ctx.kills.extend(Kill(p, dead_at, "manager-kill") for p in tree)
    return begun


async def hung_handler(ctx: FaultContext, hold: float) -> float:
    """Publish ``soak.hang`` events (each blocks a handler until its timeout)."""
    for n in range(HANGS_PER_INJECTION):
        key = f"hang-{len(ctx.hangs)}-{n}"
        ctx.hangs.append(await ctx.publisher.publish(HANG, {"n": n}, key=key))
    return time.time()


async def hostile(ctx: FaultContext, hold: float) -> float:
    """Write the hostile entries."""
    scratch = ctx.keys.stream(f"soak-scratch-{len(ctx.hostile)}")  # a fresh one each time
    ctx.hostile.extend(await write_hostile(ctx.redis, ctx.stream, scratch))
    return time.time()


INJECT: dict[str, Inject] = {
    "redis-kill": redis_kill,
    "redis-pause": redis_pause,
    "redis-oom": redis_oom,
    "pg-stop": pg_stop,
    "pg-readonly": pg_readonly,
    "pg-diskfull": pg_diskfull,
    "bot-kill": bot_kill,
    "manager-kill": manager_kill,
    "hung-handler": hung_handler,
    "hostile": hostile,
}
