"""``multibot start`` end to end: embedded defaults, status, clean stop, notify, bad config."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusClient, EventType
from bus.keys import Keys
from bus.settings import BusSettings
from manager.config import DEFAULT_CONFIG_PATH
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import (
    FAST,
    REPO,
    ManagerProcess,
    bot_toml,
    bots_before_reload,
    events,
    gone,
    rewrite_for_reload,
)
from tests.support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.one_redis]  # nothing Redis-version-specific


def multibot(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "manager.cli", *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
        timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.postgres
class TestDefaults:
    async def test_default_config_runs_embedded_services_and_stops_clean(
        self, tmp_path: Path, reachable_dir: Path
    ) -> None:
        """The checkout's config: embedded Redis + PostgreSQL + example bots; SIGTERM → exit 0."""
        manager = ManagerProcess(
            tmp_path,
            DEFAULT_CONFIG_PATH.read_text(),
            environ={"MULTIBOT_DATA_DIR": str(reachable_dir / "data")},
        )
        try:
            await manager.start()
            status = await manager.status()
            bots = {b["id"]: b for b in status["bots"]}
            assert set(bots) == {"greeter", "matcher", "shared-users"}
            assert all(b["state"] == "running" for b in bots.values())
            assert len(bots["matcher"]["instances"]) == 2
            roles = sorted(str(i["role"]) for i in bots["shared-users"]["instances"])
            assert roles == ["active", "standby"]
            assert status["manager"]["redis"].startswith("unix://")
            assert status["manager"]["postgres"].startswith("postgresql://")
            pids = [i["pid"] for b in bots.values() for i in b["instances"]]
            services = manager.children()
            shown = multibot("status", "--config", str(manager.config_path),
                             env={"MULTIBOT_DATA_DIR": str(reachable_dir / "data")})  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            for name in ("greeter", "matcher", "shared-users", "bot-group-matcher"):
                assert name in shown.stdout
            assert await manager.terminate() == 0
            await wait_until(lambda: gone(pids + services), 10, "every child process to exit")
            data = reachable_dir / "data"
            assert not (data / "manager.sock").exists()
            # The data is kept: the Redis AOF and the PostgreSQL cluster.
            assert (data / "redis" / "appendonlydir").is_dir()
            assert (data / "postgres" / "pgdata" / "PG_VERSION").is_file()
            # A restarted manager finds its data again: the events of the first run are there.
            await manager.start()
            status = await manager.status()
            assert {b["id"] for b in status["bots"]} == {"greeter", "matcher", "shared-users"}
            password = (data / "redis" / "password").read_text().strip()
            url = f"unix://:{password}@{data / 'redis' / 'redis.sock'}?db=0"
            async with Redis.from_url(url, decode_responses=True) as redis:
                shutdowns = await events(redis, Keys(), EventType.SYSTEM_SHUTDOWN)
                limits: Any = await redis.config_get("maxmemory*")
            assert len(shutdowns) == 1  # published by the first run
            # Bounded and never evicting: half the default 2 GiB budget.
            assert limits["maxmemory"] == str(1024**3)
            assert limits["maxmemory-policy"] == "noeviction"
            redis_memory = (await manager.status())["redis_memory"]
            assert redis_memory["maxmemory"] == 1024**3
            assert redis_memory["backpressure"] is False
            assert await manager.terminate() == 0
        finally:
            await manager.kill()


@pytest.mark.redis
class TestLifecycle:
    async def test_shutdown_publishes_and_stops_bots_gracefully(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """SIGTERM: system.shutdown, then each bot's stopped event with exit code 0."""
        manager = await manager_factory(
            bot_toml("a", "tests.daemon.sample_bots:steady")
            + bot_toml("b", "tests.daemon.sample_bots:steady", replicas=2)
        )
        pids = [i["pid"] for b in (await manager.status())["bots"] for i in b["instances"]]
        assert await manager.terminate() == 0
        assert gone(pids)
        found = await events(redis, keys)
        types = [e.type for e in found]
        assert EventType.SYSTEM_SHUTDOWN in types
        stopped = [e for e in found if e.type == EventType.BOT_STOPPED]
        assert sorted((e.source, e.data["instance"]) for e in stopped) == [
            ("a", "0"), ("b", "0"), ("b", "1"),
        ]  # fmt: skip
        assert all(e.data["exit_code"] == 0 for e in stopped)
        assert types.index(EventType.SYSTEM_SHUTDOWN) < types.index(EventType.BOT_STOPPED)

    async def test_reload_applies_changes_without_touching_others(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """SIGHUP: a bot added, one removed, one changed restarted, the unchanged one untouched."""
        steady = "tests.daemon.sample_bots:steady"
        manager = await manager_factory(bots_before_reload(steady))
        keep_pid = await manager.pid("keep")
        rewrite_for_reload(manager.config_path, steady)
        assert manager.process is not None
        manager.process.send_signal(1)  # SIGHUP

        async def applied() -> bool:
            found = await events(redis, keys, EventType.CONFIGURATION_UPDATED)
            return bool(found)

        await wait_until(applied, 20, "system.config.updated")
        update = (await events(redis, keys, EventType.CONFIGURATION_UPDATED))[0].data
        assert (update["added"], update["removed"], update["changed"]) == (
            ["new"], ["drop"], ["change"],
        )  # fmt: skip
        await manager.pid("new")
        await manager.pid("change", 1)
        assert await manager.pid("keep") == keep_pid
        ids = [b["id"] for b in (await manager.status())["bots"]]
        assert sorted(ids) == ["change", "keep", "new"]
        assert await manager.terminate() == 0

    async def test_maintenance_and_restart_commands(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys, tmp_path: Path
    ) -> None:
        """`multibot maintenance on|off` publishes; `multibot restart BOT` restarts it."""
        manager = await manager_factory(bot_toml("a", "tests.daemon.sample_bots:steady"))
        pid = await manager.pid("a")
        config = str(manager.config_path)
        assert (
            multibot("maintenance", "on", "--reason", "upgrade", "--config", config).returncode == 0
        )
        assert multibot("maintenance", "off", "--config", config).returncode == 0
        found = await events(redis, keys, "system.maintenance.")
        assert [(e.type, e.data.get("reason")) for e in found] == [
            (EventType.MAINTENANCE_STARTED, "upgrade"), (EventType.MAINTENANCE_ENDED, None),
        ]  # fmt: skip
        done = multibot("restart", "a", "--config", config)
        assert done.returncode == 0, done.stderr
        assert await manager.pid("a") != pid
        unknown = multibot("restart", "nope", "--config", config)
        assert unknown.returncode == 1
        assert "no bot 'nope'" in unknown.stderr
        assert multibot("stop", "--config", config).returncode == 0
        assert manager.process is not None
        assert await asyncio.wait_for(manager.process.wait(), 30) == 0


@pytest.mark.redis
class TestNotify:
    async def test_ready_watchdog_and_stopping_reach_systemd(
        self, tmp_path: Path, redis_url: str
    ) -> None:
        """Under a NOTIFY_SOCKET: READY=1 once bots run, WATCHDOG=1 pings, STOPPING=1."""
        path = tmp_path / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        messages: list[str] = []
        config = (
            f'data_dir = "data"\nredis_url = "{redis_url}"\n'
            'postgres_dsn = "postgresql://x@127.0.0.1:1/d"\n'
            + bot_toml("a", "tests.daemon.sample_bots:steady")
        )
        manager = ManagerProcess(
            tmp_path, config,
            environ={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
        )  # fmt: skip
        loop = asyncio.get_running_loop()

        async def receive() -> None:
            while True:
                messages.append((await loop.sock_recv(sock, 4096)).decode())

        reader = asyncio.create_task(receive())
        try:
            await manager.start(wait_ready=False)
            await wait_until(lambda: any("READY=1" in m for m in messages), 60, "READY=1")
            status = await manager.status()
            assert status["bots"][0]["state"] == "running"
            assert status["bots"][0]["outbox"] == 0  # Redis answered: nothing waits
            await wait_until(
                lambda: sum("WATCHDOG=1" in m for m in messages) >= 3, 10, "watchdog pings"
            )
            assert await manager.terminate() == 0
            await wait_until(lambda: any("STOPPING=1" in m for m in messages), 5, "STOPPING=1")
        finally:
            reader.cancel()
            sock.close()
            await manager.kill()


class TestBadConfig:
    def test_refused_with_every_error_named(self, tmp_path: Path) -> None:
        """A bad config: start refuses before anything runs; config check lists the same."""
        bad = tmp_path / "bad.toml"
        bad.write_text(
            'data_dir = "data"\ncolour = "blue"\n'
            + bot_toml("ok", "bots.chatbot:main")
            + bot_toml("Bad Id", "bots.chatbot:main", memory_limit="2 gigs")
            + bot_toml("ok", "not an entry", restart={"policy": "sometimes"})
        )
        started = multibot("start", "--config", str(bad))
        assert started.returncode == 1
        for expected in (
            "colour: unknown setting",
            "bots[1].id: 'Bad Id' is not a bot id",
            "bots[1].memory_limit:",
            "bots[2].entry: 'not an entry' is not an entry point",
            "bots[2].restart.policy:",
            "bots[2].id: 'ok' is already the id of bots[0]",
        ):
            assert expected in started.stderr, (expected, started.stderr)
        assert not (tmp_path / "data").exists()  # refused before anything started
        checked = multibot("config", "check", "--config", str(bad))
        assert checked.returncode == 1
        assert checked.stderr == started.stderr

    def test_unreachable_redis_is_a_clear_error(self, tmp_path: Path) -> None:
        """A configured Redis that does not answer: exit 1, saying what to do, no traceback."""
        config = tmp_path / "m.toml"
        config.write_text(
            'redis_url = "redis://127.0.0.1:1/0"\npostgres_dsn = "postgresql://x@127.0.0.1:1/x"\n'
            + bot_toml("a", "bots.chatbot:main")
        )
        # The bots share the test's user: as root, the missing default bot user would
        # stop the start before Redis is tried.
        started = multibot(
            "start", "--config", str(config), env={"MULTIBOT_SUPERVISOR__BOT_USER": ""}
        )
        assert started.returncode == 1
        assert "cannot reach Redis at redis://127.0.0.1:1/0" in started.stderr
        assert "Traceback" not in started.stderr
        assert not (tmp_path / "data" / "manager.sock").exists()

    def test_environment_overrides_and_is_named(self, tmp_path: Path) -> None:
        """MULTIBOT_* variables override the file; a bad one is named in the error."""
        env = {"MULTIBOT_COORDINATOR__LAG_THRESHOLD": "many"}
        checked = multibot("config", "check", "--config", str(DEFAULT_CONFIG_PATH), env=env)
        assert checked.returncode == 1
        assert "coordinator.lag_threshold" in checked.stderr
        assert "MULTIBOT_COORDINATOR__LAG_THRESHOLD" in checked.stderr
        fine = multibot("config", "check", "--config", str(DEFAULT_CONFIG_PATH))
        assert fine.returncode == 0
        assert "greeter×1, matcher×2, shared-users×2" in fine.stdout


@pytest.mark.redis
class TestNothingLost:
    async def test_unfinished_event_is_handled_after_the_next_start(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys, redis_url: str
    ) -> None:
        """A handler cut off by the stop timeout: its event stays pending, handled next run."""
        manager = await manager_factory(
            bot_toml(
                "slow",
                "tests.daemon.sample_bots:slowpoke",
                stop_timeout=0.5,
                subscriptions=[{"pattern": "test.#"}],
            )
        )
        await manager.pid("slow")
        async with BusClient("tester", settings=BusSettings(redis_url=redis_url)) as bus:
            event_id = await bus.publish("test.slow", {"sleep": 2.0})

        async def taken() -> bool:
            info: Any = await redis.xpending(
                keys.inbox("bot-group-slow", keys.stream("bot")), "bot-group-slow"
            )
            return bool(info["pending"])

        await wait_until(taken, 10, "the slow event to be taken")
        assert await manager.terminate() == 0
        info: Any = await redis.xpending(
            keys.inbox("bot-group-slow", keys.stream("bot")), "bot-group-slow"
        )
        assert info["pending"] == 1  # cut off, not acked, not lost
        await manager.start()
        handled = keys.bot_state("slow", "handled")

        async def done() -> bool:
            items: Any = await redis.lrange(handled, 0, -1)
            return [i.partition(":")[2] for i in items] == [event_id]

        await wait_until(done, 20, "the event handled after the restart")
        assert await manager.terminate() == 0


class TestEmbeddedRedis:
    async def test_killed_embedded_redis_comes_back_and_bots_go_on(self, tmp_path: Path) -> None:
        """SIGKILL the embedded redis-server: restarted on its AOF, bots' users back, bots work."""
        config = 'data_dir = "data"\npostgres_dsn = "postgresql://unused@127.0.0.1:1/x"\n'
        config += FAST + bot_toml(
            "worker", "tests.daemon.sample_bots:poisoned", subscriptions=[{"pattern": "test.#"}]
        )
        manager = ManagerProcess(tmp_path, config)
        try:
            await manager.start()
            data = manager.data_dir
            password = (data / "redis" / "password").read_text().strip()
            url = f"unix://:{password}@{data / 'redis' / 'redis.sock'}?db=0"
            handled = Keys().bot_state("worker", "handled")
            async with BusClient("tester", settings=BusSettings(redis_url=url)) as bus:
                first = await bus.publish("test.ok", {})
                await wait_until(lambda: _handled(bus, handled, first), 10, "the first event")
                redis_pid = manager.children("redis-server")[0]
                os.kill(redis_pid, signal.SIGKILL)

                async def back() -> bool:
                    pids = manager.children("redis-server")
                    return bool(pids) and pids[0] != redis_pid

                await wait_until(back, 20, "the embedded redis-server to be restarted")
                second = await bus.publish("test.ok", {})
                await wait_until(lambda: _handled(bus, handled, second), 20, "an event after it")
                items: Any = await bus.redis.lrange(handled, 0, -1)
                assert first in items  # the AOF kept what was there
            assert await manager.terminate() == 0
        finally:
            await manager.kill()


async def _handled(bus: BusClient, key: str, event_id: str) -> bool:
    items: Any = await bus.redis.lrange(key, 0, -1)
    return event_id in items


class TestManagerKilled:
    async def test_children_die_with_a_killed_manager(self, tmp_path: Path) -> None:
        """kill -9 the manager: its bots and embedded redis-server go too, no orphans."""
        config = 'data_dir = "data"\npostgres_dsn = "postgresql://unused@127.0.0.1:1/x"\n'
        manager = ManagerProcess(
            tmp_path, config + FAST + bot_toml("a", "tests.daemon.sample_bots:steady", replicas=2)
        )
        try:
            await manager.start()
            children = manager.children()
            assert len(children) >= 3  # two bots and redis-server
            await manager.kill()
            await wait_until(lambda: gone(children), 10, "every child of the killed manager")
        finally:
            await manager.kill()


@pytest.mark.redis
class TestToolsFindTheManager:
    async def test_events_commands_need_no_redis_url(
        self, manager_factory: ManagerFactory, redis: Redis, keys: Keys
    ) -> None:
        """With a manager running, `multibot events publish` finds its Redis by itself."""
        manager = await manager_factory(bot_toml("a", "tests.daemon.sample_bots:steady"))
        env = {"MULTIBOT_CONFIG": str(manager.config_path)}
        done = multibot("events", "publish", "note.added", "--data", '{"n": 1}', env=env)
        assert done.returncode == 0, done.stderr
        found = await events(redis, keys, "note.added")
        assert [e.data for e in found] == [{"n": 1}]
        trace_id = found[0].id

        async def archived() -> bool:
            done = await asyncio.to_thread(multibot, "events", "query", "--json", env=env)
            return done.returncode == 0 and trace_id in done.stdout

        await wait_until(archived, 20, "the event in the archive, queried with no flags")
        traced = multibot("events", "trace", trace_id, env=env)
        assert traced.returncode == 0, traced.stderr
        assert "note.added" in traced.stdout
        assert await manager.terminate() == 0
