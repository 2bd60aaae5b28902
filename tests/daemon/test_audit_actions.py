"""Every operator write through the HTTP API, the control socket and the CLI shows in
``multibot audit`` and ``GET /v1/audit`` with its actor and outcome."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from bus import BusClient, DeadLetterReason
from bus.archive import ArchiveStore
from bus.keys import Keys
from bus.settings import BusSettings
from manager.audit import audit_key, os_actor
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import bot_toml
from tests.daemon.test_api import PUBLISHER, READER, api_config, bearer
from tests.daemon.test_start import multibot
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow, pytest.mark.one_redis]


async def test_api_socket_and_cli_writes_are_recorded_with_their_actors(
    manager_factory: ManagerFactory,
    redis_server: RedisServer,
    keys: Keys,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    """A publish with the crm token, a restart and a refused delete with the admin token,
    a reload and maintenance through the socket, a retry through the CLI, a SIGHUP: each
    listed in order with its actor, channel and outcome, by the CLI and the API (admin only); the
    stop is recorded too."""
    manager = await manager_factory(
        bot_toml("a", "tests.daemon.sample_bots:steady"), extra=api_config(tmp_path)
    )
    url, admin = await manager.api()
    config = str(manager.config_path)
    async with httpx.AsyncClient(timeout=10) as http:
        published = await http.post(f"{url}/v1/events", headers=bearer(PUBLISHER),
                                    json={"type": "test.audit.checked"})  # fmt: skip
        assert published.status_code == 202, published.text
        restarted = await http.post(f"{url}/v1/bots/a/restart", headers=bearer(admin))
        assert restarted.status_code == 202, restarted.text
        missing = await http.delete(f"{url}/v1/dlq/1-0", headers=bearer(admin))
        assert missing.status_code == 404
    assert multibot("reload", "--config", config).returncode == 0
    assert multibot("maintenance", "on", "--reason", "audit", "--config", config).returncode == 0
    async with BusClient("tester", settings=BusSettings(redis_url=redis_server.url)) as bus:
        letter = await bus.dlq.add(
            fields={"type": "test.audit.failed", "source": "x", "data": "{}"},
            reason=DeadLetterReason.HANDLER_ERROR, error="boom", stream=keys.stream("bot"),
            entry_id="1-1", group="bot-group-a", consumer="a-0",
        )  # fmt: skip
    retried = multibot("dlq", "retry", letter, "--redis-url", redis_server.url,
                       "--namespace", keys.namespace)  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    assert manager.process is not None
    manager.process.send_signal(signal.SIGHUP)  # a reload nobody can be named for
    me = os_actor()
    expected = [
        ("token:crm", "api", "events.publish", None, "ok"),
        ("token:admin", "api", "restart", "a", "ok"),
        ("token:admin", "api", "dlq.delete", "1-0", "refused"),
        (me, "socket", "reload", None, "ok"),
        (me, "socket", "maintenance", None, "ok"),
        (me, "cli", "dlq.retry", letter, "ok"),
        ("signal:SIGHUP", "signal", "reload", None, "ok"),
    ]
    listed: list[dict[str, Any]] = []

    async def all_listed() -> bool:
        done = multibot("audit", "--json", "--postgres-dsn", postgres_server.dsn)
        assert done.returncode == 0, done.stderr
        listed[:] = [orjson.loads(line) for line in done.stdout.splitlines()]
        return len(listed) >= len(expected)

    await wait_until(all_listed, 30, "every action in the audit log")
    got = [(r["actor"], r["channel"], r["action"], r["target"], r["outcome"]) for r in listed]
    assert got == expected
    assert listed[0]["detail"]["count"] == 1
    assert "not found" in listed[2]["error"]
    assert listed[4]["detail"]["reason"] == "audit"
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(f"{url}/v1/audit", headers=bearer(admin), params={"action": "dlq"})
        assert page.status_code == 200, page.text
        assert [a["action"] for a in page.json()["actions"]] == ["dlq.delete", "dlq.retry"]
        assert (await http.get(f"{url}/v1/audit", headers=bearer(READER))).status_code == 403
    assert multibot("stop", "--config", config).returncode == 0
    assert manager.process is not None
    assert await asyncio.wait_for(manager.process.wait(), 60) == 0
    # Copied into PostgreSQL while the bots stopped, or waiting in Redis for the next start.
    async with Redis.from_url(redis_server.url, decode_responses=True) as redis:
        waiting: Any = await redis.xrange(audit_key(keys))
    async with await ArchiveStore.connect(postgres_server.dsn) as store:
        copied = await store.audit.list(datetime(1970, 1, 1, tzinfo=UTC), action="stop")
    stops = [(r.action, r.actor) for r in copied] + [(f["action"], f["actor"]) for _, f in waiting]
    assert stops == [("stop", me)]
