"""Supervision under a real manager: restarts with backoff, crash loops, hung bots, poison."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis

from bus import BusClient, EventType
from bus.dlq import DeadLetter
from bus.keys import Keys
from bus.settings import BusSettings
from manager.control import ControlError
from manager.embedded.postgres_server import PostgresServer
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import FAST, ManagerProcess, bot_toml, events
from tests.support import wait_until

# Whole-daemon behaviour; what differs between Redis versions is tested below it (bus,
# lag, handover, lease) on each version.
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.one_redis]
STEADY = "tests.daemon.sample_bots:steady"


class TestRestart:
    async def test_killed_bot_is_restarted_with_events(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """kill -9 a bot: it is restarted, and stopped + started events are on the bus."""
        manager = await manager_factory(bot_toml("worker", STEADY))
        pid = await manager.pid("worker")
        os.kill(pid, signal.SIGKILL)

        async def restarted() -> bool:
            row = (await manager.instances("worker"))[0]
            return row["pid"] not in (None, pid) and row["state"] == "running"

        await wait_until(restarted, 20, "the killed bot to run again")
        row = (await manager.instances("worker"))[0]
        assert row["restarts"] == 1
        assert row["last_exit"] == "killed by SIGKILL"

        async def announced() -> bool:
            found = await events(redis, keys, "bot.lifecycle.")
            return any(e.type == EventType.BOT_STOPPED and e.data.get("pid") == pid for e in found)

        await wait_until(announced, 10, "bot.lifecycle.stopped of the killed pid")
        lifecycle = [e for e in await events(redis, keys, "bot.lifecycle.") if e.source == "worker"]
        stopped = next(e for e in lifecycle if e.type == EventType.BOT_STOPPED)
        assert stopped.data["signal"] == "SIGKILL"
        assert stopped.data["published_by"] == "manager"
        started = [e for e in lifecycle if e.type == EventType.BOT_STARTED]
        assert [e.data["pid"] for e in started][-1] == row["pid"]
        assert len(started) == 2
        assert await manager.terminate() == 0

    async def test_crash_loop_marks_failed_and_spares_others(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """A bot that keeps crashing is failed after N restarts; another bot keeps running."""
        loop = {"backoff_base": 0.05, "backoff_cap": 0.1, "crash_loop_restarts": 3,
                "crash_loop_window": 60.0}  # fmt: skip
        manager = await manager_factory(
            bot_toml("good", STEADY)
            + bot_toml("bad", "tests.daemon.sample_bots:crasher", restart=loop)
        )
        good_pid = await manager.pid("good")

        async def failed() -> bool:
            return bool((await manager.instances("bad"))[0]["state"] == "failed")

        await wait_until(failed, 30, "the crashing bot to be marked failed")
        row = (await manager.instances("bad"))[0]
        assert row["restarts"] == 3
        assert row["last_exit"] == "exit 3"
        good = (await manager.instances("good"))[0]
        assert (good["pid"], good["state"], good["restarts"]) == (good_pid, "running", 0)

        async def error_published() -> bool:
            found = await events(redis, keys, EventType.BOT_ERROR)
            return any(e.source == "bad" for e in found)

        await wait_until(error_published, 10, "bot.lifecycle.error for the crash loop")
        error = next(e for e in await events(redis, keys, EventType.BOT_ERROR))
        assert "crash loop" in error.data["error"]
        assert error.data["error_type"] == "crash_loop"
        # An operator fixes it and restarts it by hand: it gets a new chance.
        await manager.command("restart", bot="bad")
        assert await manager.terminate() == 0


class TestHung:
    async def test_silent_bot_is_reported_and_restarted(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys, redis_url: str
    ) -> None:
        """A bot whose loop blocks stops beating: health_changed is published, it restarts."""
        manager = await manager_factory(
            bot_toml("sleepy", "tests.daemon.sample_bots:hanger", stop_timeout=1)
        )
        pid = await manager.pid("sleepy")
        async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
            await bus.publish("test.hang", {})

        async def replaced() -> bool:
            row = (await manager.instances("sleepy"))[0]
            return row["pid"] not in (None, pid) and row["state"] == "running"

        await wait_until(replaced, 30, "the hung bot to be restarted")

        async def healthy_again() -> bool:
            found = await events(redis, keys, EventType.BOT_HEALTH_CHANGED)
            return [e.data["healthy"] for e in found] == [False, True]

        await wait_until(healthy_again, 10, "health_changed false, then true")
        first = (await events(redis, keys, EventType.BOT_HEALTH_CHANGED))[0]
        assert "no heartbeat" in first.data["reason"]
        assert first.source == "sleepy"
        # The event that hung it is still pending: the new process hangs on it again,
        # so stop without waiting for that.
        assert await manager.terminate() == 0


class TimedManagerFactory(Protocol):
    """Starts a manager running ``bots`` with this ``[supervisor]`` table; returns at once
    (it does not wait for the bots)."""

    async def __call__(self, bots: str, *, supervisor: Mapping[str, float]) -> ManagerProcess: ...


@pytest.fixture
async def timed_manager(
    tmp_path: Path, redis_url: str, postgres_server: PostgresServer
) -> AsyncIterator[TimedManagerFactory]:
    """Like ``manager_factory``, with the heartbeat and start-up timeouts chosen by the test;
    each manager is SIGKILLed at teardown if still running."""
    started: list[ManagerProcess] = []
    rest_of_fast = FAST[FAST.index("[coordinator]") :]  # its [supervisor] is the test's

    async def start(bots: str, *, supervisor: Mapping[str, float]) -> ManagerProcess:
        timings = "".join(f"{key} = {value}\n" for key, value in supervisor.items())
        config = (
            f'data_dir = "data"\nredis_url = "{redis_url}"\n'
            f'postgres_dsn = "{postgres_server.dsn}"\n'
            f"[supervisor]\n{timings}{rest_of_fast}{bots}"
        )
        work = tmp_path / f"manager-{len(started)}"
        work.mkdir()
        manager = ManagerProcess(work, config)
        started.append(manager)
        await manager.start(wait_ready=False)
        return manager

    yield start
    for manager in started:
        await manager.kill()


async def first_row(manager: ManagerProcess, bot_id: str) -> dict[str, Any] | None:
    """The status row of ``bot_id``'s instance 0 once the manager answers, else None."""
    assert manager.process is not None
    assert manager.process.returncode is None, f"the manager exited:\n{manager.log()}"
    try:
        status = await manager.status()
    except ControlError:
        return None
    rows = [bot["instances"] for bot in status["bots"] if bot["id"] == bot_id]
    return dict(rows[0][0]) if rows and rows[0] else None


class TestSlowStart:
    async def test_import_slower_than_heartbeat_timeout_is_not_hung(
        self, timed_manager: TimedManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """A bot whose import outlasts the heartbeat timeout, not the start-up timeout, is
        not killed as hung: its first process runs, without a restart."""
        manager = await timed_manager(
            bot_toml("heavy", "tests.daemon.slow_import:main"),
            supervisor={"heartbeat_interval": 1.0, "heartbeat_timeout": 2.5,
                        "startup_timeout": 20.0},
        )  # fmt: skip
        seen: list[dict[str, Any]] = []

        async def spawned() -> bool:
            row = await first_row(manager, "heavy")
            if row is not None and row["pid"] is not None:
                seen.append(row)
            return bool(seen)

        await wait_until(spawned, 30, "the bot's first process to be spawned")
        first = seen[0]
        # Still importing: no heartbeat yet, and the status does not claim one.
        assert (first["state"], first["heartbeat_age"]) == ("starting", None)

        async def running() -> bool:
            row = await first_row(manager, "heavy")
            return row is not None and row["state"] == "running"

        await wait_until(running, 30, "the slow-importing bot to run")
        row = await first_row(manager, "heavy")
        assert row is not None
        assert (row["pid"], row["restarts"], row["last_exit"]) == (first["pid"], 0, None)
        assert row["heartbeat_age"] is not None
        assert await events(redis, keys, EventType.BOT_HEALTH_CHANGED) == []
        assert await manager.terminate() == 0

    async def test_bot_that_never_beats_is_hung_after_startup_timeout(
        self, timed_manager: TimedManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """A bot whose import never returns is reported hung once the start-up timeout is
        over (the reason says so), and restarted."""
        manager = await timed_manager(
            bot_toml("stuck", "tests.daemon.stuck_import:main", stop_timeout=1),
            supervisor={"heartbeat_interval": 1.0, "heartbeat_timeout": 2.5,
                        "startup_timeout": 3.0},
        )  # fmt: skip
        pids: list[int] = []

        async def spawned() -> bool:
            row = await first_row(manager, "stuck")
            if row is not None and row["pid"] is not None:
                pids.append(row["pid"])
            return bool(pids)

        await wait_until(spawned, 30, "the bot's first process to be spawned")

        async def reported() -> bool:
            return bool(await events(redis, keys, EventType.BOT_HEALTH_CHANGED))

        await wait_until(reported, 30, "health_changed for the silent bot")
        hung = (await events(redis, keys, EventType.BOT_HEALTH_CHANGED))[0]
        assert (hung.source, hung.data["healthy"]) == ("stuck", False)
        assert hung.data["reason"] == "no first heartbeat within 3s of start"

        async def replaced() -> bool:
            row = await first_row(manager, "stuck")
            return row is not None and row["pid"] not in (None, pids[0])

        await wait_until(replaced, 30, "the hung bot to be restarted")
        row = await first_row(manager, "stuck")
        assert row is not None
        assert row["restarts"] >= 1
        assert row["last_exit"] == "killed by SIGTERM"
        assert await manager.terminate() == 0


class TestPoison:
    async def test_entry_that_crashes_the_bot_is_dead_lettered(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys, redis_url: str
    ) -> None:
        """An event in flight at N consecutive crashes goes to the DLQ; the bot then runs."""
        fast = {"backoff_base": 0.05, "backoff_cap": 0.1, "crash_loop_restarts": 10}
        manager = await manager_factory(
            bot_toml(
                "fragile",
                "tests.daemon.sample_bots:poisoned",
                subscriptions=[{"pattern": "test.#"}],
                restart=fast,
            )
        )
        await manager.pid("fragile")
        async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
            bad = await bus.publish("test.poison", {})
            good = await bus.publish("test.ok", {})
            dead = await wait_for_dead_letter(bus, bad)
        assert dead.reason == "crashed"
        assert "3 consecutive crashes" in dead.error
        assert "exit 9" in dead.error
        handled = keys.bot_state("fragile", "handled")
        await wait_until(
            lambda: _contains(redis, handled, good), 20, "the good event handled after"
        )
        row = (await manager.instances("fragile"))[0]
        assert row["state"] == "running"
        assert await manager.terminate() == 0


async def wait_for_dead_letter(bus: BusClient, event_id: str) -> DeadLetter:
    found: list[DeadLetter] = []

    async def there() -> bool:
        for letter in await bus.dlq.list():
            if letter.event_id == event_id:
                found.append(letter)
                return True
        return False

    await wait_until(there, 30, f"event {event_id} in the dead-letter stream")
    return found[0]


async def _contains(redis: Redis, key: str, value: str) -> bool:
    items: Any = await redis.lrange(key, 0, -1)
    return value in items


class TestHandover:
    async def test_dead_replicas_entries_go_to_a_live_one_at_once(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys, redis_url: str
    ) -> None:
        """A replica dies holding entries: the live replica handles them long before the
        visibility timeout (60 s) would have let it."""
        manager = await manager_factory(
            bot_toml(
                "pair",
                "tests.daemon.sample_bots:slowpoke",
                replicas=2,
                subscriptions=[{"pattern": "test.#"}],
                consumer={"visibility_timeout": 60.0, "block_ms": 200},
                restart={"policy": "never"},
            )
        )
        await manager.pid("pair", 0)
        await manager.pid("pair", 1)
        async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
            ids = [await bus.publish("test.slow", {"sleep": 1.5}) for _ in range(8)]
            stream = keys.stream(bus.router.route("test.slow"))
        holders: dict[str, int] = {}

        async def both_hold() -> bool:
            inbox = keys.inbox("bot-group-pair", stream)
            rows: Any = await redis.xpending_range(inbox, "bot-group-pair", "-", "+", 100)
            holders.clear()
            for row in rows:
                holders[row["consumer"]] = holders.get(row["consumer"], 0) + 1
            return len(ids) == sum(holders.values()) and bool(holders)

        await wait_until(both_hold, 10, "the entries to be taken")
        victim = max(holders, key=lambda c: holders[c])
        index = int(victim.rpartition("-")[2])
        os.kill(await manager.pid("pair", index), signal.SIGKILL)
        handled_key = keys.bot_state("pair", "handled")

        async def all_handled() -> bool:
            done: Any = await redis.lrange(handled_key, 0, -1)
            return {d.partition(":")[2] for d in done} >= set(ids)

        await wait_until(all_handled, 20, "every event handled though a replica died")
        done: Any = await redis.lrange(handled_key, 0, -1)
        survivors = {d.partition(":")[0] for d in done if d.partition(":")[2] in ids}
        assert str(1 - index) in survivors
        rows = (await manager.instances("pair"))[index]
        assert rows["state"] == "stopped"  # restart policy "never": nobody but the live one
        assert await manager.terminate() == 0


class TestCannotStart:
    async def test_missing_module_fails_at_once_and_says_why(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """An entry point that does not import: failed without restarts, error published."""
        manager = await manager_factory(
            bot_toml("typo", "tests.daemon.no_such_module:main") + bot_toml("fine", STEADY)
        )

        async def failed() -> bool:
            return bool((await manager.instances("typo"))[0]["state"] == "failed")

        await wait_until(failed, 20, "the bot that cannot start to be failed")
        assert (await manager.instances("typo"))[0]["restarts"] == 0
        assert (await manager.instances("fine"))[0]["state"] == "running"

        async def reported() -> bool:
            return bool(await events(redis, keys, EventType.BOT_ERROR))

        await wait_until(reported, 10, "bot.lifecycle.error")
        error = (await events(redis, keys, EventType.BOT_ERROR))[0]
        assert error.data["error_type"] == "start_failure"
        assert "cannot import 'tests.daemon.no_such_module'" in error.data["error"]
        assert await manager.terminate() == 0
