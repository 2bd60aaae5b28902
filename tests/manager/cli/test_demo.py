"""``multibot demo``: the example bots with simulated users, every event printed."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from bots import chatbot
from bots.runtime.entry import load_main
from bus import Event
from manager.cli.demo import DEMO_NAMESPACE, demo, describe, run_demo
from manager.embedded.redis_server import free_port
from tests.support import redis_client

SEED = 2  # with 2 users, the second message already makes a shared user


def problems(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Captured log entries at warning level or above."""
    return [e for e in logs if e["log_level"] in ("warning", "error", "critical")]


class TestDescribe:
    def test_one_line_with_time_type_source_and_data(self) -> None:
        """An event is one line: local time, type, source, then its data as key=value."""
        event = Event(
            type="multibot.user.shared_detected",
            data={"user_id": "u1", "bot_ids": ["greeter", "matcher"], "text": "hi there"},
            source="shared-users",
            timestamp=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        )
        line = describe(event)
        assert "\n" not in line
        assert re.match(
            r"^\d\d:\d\d:\d\d\.678  multibot\.user\.shared_detected +shared-users ", line
        )
        assert line.endswith('user_id=u1 bot_ids=greeter,matcher text="hi there"')

    def test_entry_points_name_bot_mains(self) -> None:
        """An entry point resolves to the bot's main, as the manager will resolve it."""
        assert load_main("bots.chatbot:main") is chatbot.main
        assert load_main("bots.chatbot") is chatbot.main


@pytest.mark.redis
@pytest.mark.one_redis  # the demo's output does not differ between Redis versions
class TestRunDemo:
    async def test_prints_messages_replies_and_coordination(self, redis_url: str) -> None:
        """Two seconds of demo show messages, replies, a shared user and the roles taken."""
        lines: list[str] = []
        with capture_logs() as logs:
            shown = await run_demo(redis_url, 2.0, 2, lines.append, seed=SEED, rate=10)
        text = "\n".join(lines)
        for type_ in (
            "user.message.received",
            "user.message.sent",
            "multibot.user.shared_detected",
            "multibot.user.role_assigned",
        ):
            assert type_ in text, f"no {type_} line in:\n{text}"
        assert "role=primary primary=greeter" in text and "role=secondary" in text
        assert shown == len([line for line in lines if re.match(r"^\d\d:\d\d:\d\d\.", line)])
        assert problems(logs) == []

    async def test_stop_ends_an_open_ended_demo(self, redis_url: str) -> None:
        """With duration 0 the demo runs until stop is set, then returns cleanly."""
        stop = asyncio.Event()

        def echo(line: str) -> None:
            if "multibot.user.role_assigned" in line:
                stop.set()

        async with asyncio.timeout(20):
            shown = await run_demo(redis_url, 0, 2, echo, seed=SEED, rate=10, stop=stop)
        assert stop.is_set() and shown >= 4

    async def test_keys_stay_in_the_demo_namespace(self, redis_url: str) -> None:
        """Every key the demo writes carries its own namespace, apart from a deployment's."""
        await run_demo(redis_url, 1.0, 2, lambda line: None, seed=SEED, rate=10)
        async with redis_client(redis_url, decode_responses=True) as redis:
            keys: Any = [k async for k in redis.scan_iter(match="*")]
        assert keys and all(key.startswith(f"{DEMO_NAMESPACE}:") for key in keys)


class TestDemoCommand:
    def test_runs_on_its_own_private_redis(self) -> None:
        """With no URL `multibot demo` starts a private Redis, prints events, stops it, exits 0.

        Run as a real process: the command runs its own (uvloop) event loop and subprocess.
        """
        env = {k: v for k, v in os.environ.items() if k != "MULTIBOT_REDIS_URL"}
        args = ["--duration", "2", "--users", "2", "--seed", str(SEED), "--rate", "10"]
        result = subprocess.run(
            [sys.executable, "-m", "manager.cli", "demo", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "started a private redis-server" in result.stdout
        assert "user.message.received" in result.stdout
        assert "multibot.user.shared_detected" in result.stdout
        assert re.search(r"^demo stopped after \d+ events$", result.stdout, re.MULTILINE)
        assert "Traceback" not in result.stderr

    def test_unreachable_redis_is_a_one_line_error(self) -> None:
        """A --redis-url nobody listens on fails with exit 1 and a message, no traceback."""
        url = f"redis://127.0.0.1:{free_port()}/0"
        with capture_logs():
            result = CliRunner().invoke(demo, ["--redis-url", url, "--duration", "1"])
        assert result.exit_code == 1
        assert "cannot reach Redis" in result.output and "Traceback" not in result.output

    def test_bad_options_are_usage_errors(self) -> None:
        """A URL of the wrong scheme or a negative duration is refused before anything runs."""
        result = CliRunner().invoke(demo, ["--redis-url", "http://x"])
        assert result.exit_code == 2 and "--redis-url" in result.output
        result = CliRunner().invoke(demo, ["--duration", "-1"])
        assert result.exit_code == 2 and "--duration" in result.output
