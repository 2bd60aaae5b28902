"""The delivery trail on a real ``multibot start``: ``multibot events show ID`` lists every
group an event reached or should have reached, with what it did, and stays exact across a
manager restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest

from bus import BusClient
from bus.archive import ArchiveStore
from bus.settings import BusSettings
from manager.embedded.postgres_server import PostgresServer
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import ManagerProcess
from tests.daemon.test_start import multibot
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow, pytest.mark.one_redis]

CRASH_LOOP = {"backoff_base": 0.05, "backoff_cap": 0.1, "crash_loop_restarts": 2,
              "crash_loop_window": 60.0}  # fmt: skip


def bot(
    bot_id: str, entry: str, restart: dict[str, Any] | None = None, stop_timeout: float = 10
) -> str:
    """A bot declaring a subscription to ``note.#``."""
    lines = ["[[bots]]", f'id = "{bot_id}"', f'entry = "{entry}"', f"stop_timeout = {stop_timeout}"]
    if restart:
        lines += ["[bots.restart]", *(f"{k} = {v}" for k, v in restart.items())]
    lines += ["[[bots.subscriptions]]", 'pattern = "note.#"']
    return "\n".join(lines) + "\n"


BOTS = (
    bot("noter", "tests.daemon.delivery_bots:noter")
    + bot("keeper", "tests.daemon.delivery_bots:noter")
    + bot("refuser", "tests.daemon.delivery_bots:refuser")
    + bot("down", "tests.daemon.sample_bots:crasher", CRASH_LOOP)
)


def show(manager: ManagerProcess, event_id: str, *flags: str) -> str:
    done = multibot("events", "show", event_id, *flags,
                    env={"MULTIBOT_CONFIG": str(manager.config_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


async def groups_of(manager: ManagerProcess, event_id: str) -> dict[str, Any] | None:
    done = await asyncio.to_thread(
        multibot, "events", "show", event_id, "--json",
        env={"MULTIBOT_CONFIG": str(manager.config_path)},
    )  # fmt: skip
    if done.returncode != 0:
        return None
    return {g["group"]: g for g in orjson.loads(done.stdout)["groups"]}


async def publish(redis_url: str, count: int, key: str | None = None) -> list[str]:
    """``count`` note.added events (with ``key``: one after the other in each handler)."""
    async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
        return [await bus.publish("note.added", {"n": n}, key=key) for n in range(count)]


async def test_events_show_lists_handled_dead_lettered_and_not_handled_groups(
    manager_factory: ManagerFactory, redis_url: str
) -> None:
    """One event, four bots declaring note.#: noter's and keeper's groups both handled it
    (each with its consumer and times), refuser's dead-lettered it (its DLQ id, 2
    attempts), and the down bot's group is expected and shows "expected, not handled"."""
    manager = await manager_factory(BOTS)
    (event_id,) = await publish(redis_url, 1)

    async def told() -> bool:
        groups = await groups_of(manager, event_id) or {}
        return (
            all(groups.get(f"bot-group-{b}", {}).get("status") == "handled"
                for b in ("noter", "keeper"))
            and bool(groups.get("bot-group-refuser", {}).get("dead_letters"))
        )  # fmt: skip

    await wait_until(told, 40, "every outcome archived")
    groups = await groups_of(manager, event_id)
    assert groups is not None
    assert set(groups) == {f"bot-group-{b}" for b in ("noter", "keeper", "refuser", "down")}
    for name in ("noter", "keeper"):
        (handled,) = groups[f"bot-group-{name}"]["outcomes"]
        assert (handled["outcome"], handled["consumer"]) == ("handled", f"{name}-0")
        assert handled["attempts"] == 1
        assert handled["handler_ms"] >= 15  # a 20 ms sleep; timers may fire a little early
        assert handled["read_at"] < handled["done_at"]
    refused = groups["bot-group-refuser"]
    assert refused["status"] == "dead_lettered"
    (letter,) = refused["dead_letters"]
    assert letter["attempts"] == 2 and letter["reason"] == "handler_error"
    down = groups["bot-group-down"]
    assert (down["expected"], down["status"], down["outcomes"]) == (True, "not handled", [])

    text = show(manager, event_id)
    lines = text.splitlines()
    assert "note.added" in lines[0] and event_id in lines[1]
    for name in ("noter", "keeper"):
        line = next(line for line in lines if line.startswith(f"bot-group-{name}"))
        assert "handled" in line and f"{name}-0" in line
    dlq = next(line for line in lines if "DLQ" in line)
    assert dlq.startswith("bot-group-refuser") and "dead_lettered" in dlq
    assert f"DLQ {letter['dlq_id']}: handler_error after 2 attempts" in dlq
    assert any(line.startswith("bot-group-down") and "expected, not handled" in line
               for line in lines)  # fmt: skip
    assert await manager.terminate() == 0


async def test_records_stay_exact_across_a_manager_restart(
    manager_factory: ManagerFactory, redis_url: str, postgres_server: PostgresServer
) -> None:
    """150 events of one key (some 3 s of work, one at a time), the manager stopped once
    noter has handled some (noter given 0.3 s to finish: most stay pending) and started
    again: each event ends with exactly one handled outcome in noter's group, none
    missing, none twice; those left pending show a second delivery, and a handler the stop
    cut short is recorded as retried before the delivery that handled it."""
    noter = bot("noter", "tests.daemon.delivery_bots:noter", stop_timeout=0.3)
    manager = await manager_factory(noter)
    ids = await publish(redis_url, 150, key="one")
    await wait_until(lambda: _handled(postgres_server, ids, 1), 30, "the first ones recorded")
    assert await manager.terminate() == 0
    assert await _handled_count(postgres_server, ids) < len(ids), "all handled before the stop"
    await manager.start()
    await wait_until(lambda: _handled(postgres_server, ids, len(ids)), 60, "every one recorded")
    async with await ArchiveStore.connect(postgres_server.dsn) as store, store.connection() as conn:
        rows = await conn.fetch(
            "SELECT DISTINCT event_id, outcome, consumer, attempts, entry_id, done_at "
            "FROM deliveries WHERE bot = 'noter'"
        )
    handled = {str(r["event_id"]): r for r in rows if r["outcome"] == "handled"}
    assert Counter(str(r["event_id"]) for r in rows if r["outcome"] == "handled") == Counter(ids)
    assert {r["outcome"] for r in rows} <= {"handled", "retried"}
    for retried in (r for r in rows if r["outcome"] == "retried"):
        later = handled[str(retried["event_id"])]
        assert later["attempts"] > retried["attempts"]
        assert later["done_at"] > retried["done_at"]
    assert any(r["attempts"] >= 2 for r in handled.values()), "nothing was delivered again"
    assert await manager.terminate() == 0


async def _handled_count(postgres: PostgresServer, ids: list[str]) -> int:
    async with await ArchiveStore.connect(postgres.dsn) as store, store.connection() as conn:
        return int(await conn.fetchval(
            "SELECT count(DISTINCT event_id) FROM deliveries WHERE outcome = 'handled' "
            "AND event_id = ANY($1::uuid[])", ids,
        ))  # fmt: skip


async def _handled(postgres: PostgresServer, ids: list[str], at_least: int) -> bool:
    try:
        return await _handled_count(postgres, ids) >= at_least
    except Exception:  # the table not there yet (the manager migrates at start)
        return False
