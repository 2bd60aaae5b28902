"""Tests for the ``multibot`` command line: ``events publish|tail`` and ``dlq …``.

The commands run their own event loop, so the tests are sync: setup and checks use the
sync redis client, and ``tail`` runs as ``python -m manager.cli`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner, Result
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from bus.connection import redact
from bus.dlq import DeadLetterReason, DeadLetters
from bus.event import Event
from bus.keys import Keys
from bus.wire import encode
from manager.cli import main
from manager.cli.events import _since_id
from manager.embedded.redis_server import free_port
from tests.conftest import RedisFactory
from tests.daemon.manager_process import FAST, ManagerProcess, events
from tests.support import redis_client, sync_redis_client

ROOT = Path(__file__).resolve().parents[3]
KEYS = Keys("multibot")
USER_STREAM = KEYS.stream("user")
BOT_STREAM = KEYS.stream("bot")


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[Redis]:
    """A sync client of the test's Redis, for setup and checks around the commands."""
    client = sync_redis_client(redis_url, decode_responses=True)
    yield client
    client.close()


def invoke(url: str, *args: str, input: str | None = None) -> Result:
    """Run ``multibot ARGS`` in-process against ``url``."""
    env = {"MULTIBOT_REDIS_URL": url, "MULTIBOT_NAMESPACE": None}
    return CliRunner().invoke(main, list(args), env=env, input=input)


def publish(url: str, type_: str, data: dict[str, Any]) -> str:
    """Publish through the CLI; return the printed event id."""
    result = invoke(url, "events", "publish", type_, "--data", orjson.dumps(data).decode())
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def entries(client: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """The entries of a stream (XRANGE)."""
    rows: Any = client.xrange(key)
    return [(entry_id, dict(fields)) for entry_id, fields in rows]


def unreachable_url(password: str = "") -> str:
    """A URL on a local port nothing listens on."""
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{free_port()}/0"


class TestMain:
    def test_version(self) -> None:
        """--version prints the installed package version."""
        result = CliRunner().invoke(main, ["--version"])
        assert result.exit_code == 0
        assert (
            result.stdout.strip() == f"multibot, version {importlib.metadata.version('multibot')}"
        )

    def test_help_lists_the_groups(self) -> None:
        """--help lists the events and dlq groups; each command documents the common options."""
        result = CliRunner().invoke(main, ["--help"])
        assert result.exit_code == 0
        assert "events" in result.stdout and "dlq" in result.stdout
        sub = CliRunner().invoke(main, ["dlq", "list", "--help"])
        assert "MULTIBOT_REDIS_URL" in sub.stdout and "MULTIBOT_NAMESPACE" in sub.stdout

    def test_runs_as_python_module(self) -> None:
        """`python -m manager.cli` is the same command."""
        done = subprocess.run(
            [sys.executable, "-m", "manager.cli", "--help"],
            capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Usage: multibot")


def write_config(directory: Path, extra: str = "") -> Path:
    """A manager config in ``directory`` (data dir ``directory/data``, no bots)."""
    path = directory / "multibot.toml"
    path.write_text('data_dir = "data"\n' + extra)
    return path


def invoke_without_url(config: Path, *args: str, namespace: str | None = None) -> Result:
    """Run ``multibot ARGS`` in-process with no Redis URL, on the manager config ``config``."""
    env = {
        "MULTIBOT_REDIS_URL": None,
        "MULTIBOT_NAMESPACE": namespace,
        "MULTIBOT_CONFIG": str(config),
    }
    return CliRunner().invoke(main, list(args), env=env)


#: Commands that need the bus's Redis, each as it would be typed.
REDIS_COMMANDS = [
    ("dlq", "list"),
    ("dlq", "show", "1-1"),
    ("events", "publish", "user.x.y"),
    ("events", "tail", "user.#"),
]


class TestNoRedisFound:
    """No URL given, no manager running, no redis_url in the config: refuse, never guess."""

    @pytest.mark.parametrize("args", REDIS_COMMANDS, ids=" ".join)
    def test_refused_with_what_to_do(self, tmp_path: Path, args: tuple[str, ...]) -> None:
        """Exit 2 naming the config and its data dir, and saying how to get a Redis."""
        config = write_config(tmp_path)
        result = invoke_without_url(config, *args)
        assert result.exit_code == 2, result.output
        message = " ".join(result.stderr.split())  # click wraps nothing, but be safe
        data_dir = (tmp_path / "data").resolve()
        assert f"no manager is running for config {config} (data dir {data_dir})" in message
        assert "sets no redis_url" in message
        assert "`multibot start`" in message and "--redis-url" in message
        assert "MULTIBOT_REDIS_URL" in message
        assert result.stdout == "" and "6379" not in result.output

    def test_stale_control_socket(self, tmp_path: Path) -> None:
        """A socket file nobody listens on (a killed manager) is refused the same way."""
        config = write_config(tmp_path)
        (tmp_path / "data").mkdir()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(tmp_path / "data" / "manager.sock"))  # bound, never listening
        result = invoke_without_url(config, "dlq", "list")
        assert result.exit_code == 2, result.output
        assert "no manager is running for config" in result.stderr
        assert "--redis-url" in result.stderr

    def test_unreadable_config(self, tmp_path: Path) -> None:
        """A config that cannot be read is named, with the same advice."""
        result = invoke_without_url(tmp_path / "missing.toml", "dlq", "list")
        assert result.exit_code == 2, result.output
        assert "missing.toml" in result.stderr and "cannot read it" in result.stderr
        assert "--redis-url" in result.stderr


@pytest.mark.redis
class TestRedisFromTheConfig:
    async def test_config_redis_url_is_used_and_named(
        self, tmp_path: Path, redis_factory: RedisFactory
    ) -> None:
        """No manager: the config's redis_url and namespace, named on stderr, password hidden."""
        server = await redis_factory(password="s3cret")
        config = write_config(tmp_path, f'redis_url = "{server.url}"\nnamespace = "cfg"\n')
        result = await asyncio.to_thread(
            invoke_without_url, config, "events", "publish", "user.x.y"
        )
        assert result.exit_code == 0, result.output
        assert uuid.UUID(result.stdout.strip()).version == 7  # stdout: the id only
        assert (
            result.stderr == f"Redis: {redact(server.url)}, namespace cfg (redis_url of {config})\n"
        )
        assert "s3cret" not in result.output and ":***@" in result.stderr
        listed = await asyncio.to_thread(invoke_without_url, config, "dlq", "list")
        assert (listed.exit_code, listed.stdout) == (0, "No dead letters.\n")
        async with AsyncRedis.from_url(server.url, decode_responses=True) as client:
            assert await client.xlen(Keys("cfg").stream("user")) == 1

    async def test_given_namespace_wins(self, tmp_path: Path, redis_factory: RedisFactory) -> None:
        """MULTIBOT_NAMESPACE is kept when the Redis comes from the config."""
        server = await redis_factory()
        config = write_config(tmp_path, f'redis_url = "{server.url}"\nnamespace = "cfg"\n')
        result = await asyncio.to_thread(
            invoke_without_url, config, "events", "publish", "user.x.y", namespace="mine"
        )
        assert result.exit_code == 0, result.output
        assert ", namespace mine (" in result.stderr
        async with AsyncRedis.from_url(server.url, decode_responses=True) as client:
            assert await client.xlen(Keys("mine").stream("user")) == 1
            assert await client.exists(Keys("cfg").stream("user")) == 0

    @pytest.mark.parametrize("how", ["flag", "env"])
    def test_explicit_url_wins_silently(
        self, tmp_path: Path, redis_url: str, sync_redis: Redis, how: str
    ) -> None:
        """--redis-url or MULTIBOT_REDIS_URL is used as given: no lookup, nothing on stderr."""
        config = write_config(tmp_path, f'redis_url = "{unreachable_url()}"\n')
        env = {"MULTIBOT_CONFIG": str(config), "MULTIBOT_NAMESPACE": None}
        args = ["events", "publish", "user.x.y"]
        if how == "flag":
            env["MULTIBOT_REDIS_URL"] = None
            args += ["--redis-url", redis_url]
        else:
            env["MULTIBOT_REDIS_URL"] = redis_url
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert len(entries(sync_redis, USER_STREAM)) == 1


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """``python -m manager.cli ARGS`` as a real process, with no Redis URL, on ``config``."""
    env = {**os.environ, "MULTIBOT_CONFIG": str(config)}
    env.pop("MULTIBOT_REDIS_URL", None)
    env.pop("MULTIBOT_NAMESPACE", None)
    return subprocess.run(
        [sys.executable, "-m", "manager.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.redis
class TestRedisFromTheManager:
    async def test_running_manager_redis_is_used_and_named(self, tmp_path: Path) -> None:
        """A manager on its embedded Redis: the commands use that Redis and name it on stderr."""
        config = 'data_dir = "data"\npostgres_dsn = "postgresql://unused@127.0.0.1:1/x"\n'
        manager = ManagerProcess(tmp_path, config + FAST)  # no redis_url: only it knows where
        try:
            await manager.start()
            found = await manager.command("connection")
            url = found["redis_url"]
            password = url.split("@")[0].rpartition(":")[2]
            assert url.startswith("unix://") and password

            listed = await asyncio.to_thread(run_cli, "dlq", "list", config=manager.config_path)
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout == "No dead letters.\n"
            origin = f"the manager running on {manager.data_dir}"
            assert listed.stderr == f"Redis: {redact(url)}, namespace multibot ({origin})\n"
            assert password not in listed.stderr

            data = ["--data", '{"n": 1}']
            published = await asyncio.to_thread(
                run_cli, "events", "publish", "note.added", *data, config=manager.config_path
            )
            assert published.returncode == 0, published.stderr
            async with AsyncRedis.from_url(url, decode_responses=True) as client:
                found_events = await events(client, KEYS, "note.added")
            assert [e.id for e in found_events] == [published.stdout.strip()]
            assert await manager.terminate() == 0
        finally:
            await manager.kill()


class TestPublishChecks:
    """Checks that fail before any Redis round trip (the URL points nowhere)."""

    def test_bad_json_is_a_usage_error(self) -> None:
        """Data that is not JSON exits 2 naming --data and the parse error."""
        result = invoke(unreachable_url(), "events", "publish", "user.x.y", "--data", "{1")
        assert result.exit_code == 2
        assert "'--data'" in result.stderr and "not valid JSON" in result.stderr

    def test_data_must_be_an_object(self) -> None:
        """A JSON array is refused like the library refuses it."""
        result = invoke(unreachable_url(), "events", "publish", "user.x.y", "--data", "[1]")
        assert result.exit_code == 2
        assert "must be a JSON object" in result.stderr

    def test_invalid_type_is_a_usage_error(self) -> None:
        """A type that is not dotted lowercase exits 2 with the library's explanation."""
        result = invoke(unreachable_url(), "events", "publish", "User.Bad")
        assert result.exit_code == 2
        assert "'TYPE'" in result.stderr and "not a valid event type" in result.stderr

    def test_schema_mismatch_is_a_usage_error(self) -> None:
        """Data of a standard type is checked against its schema, naming the bad fields."""
        result = invoke(
            unreachable_url(), "events", "publish", "user.message.received", "--data", "{}"
        )
        assert result.exit_code == 2
        assert "user_id" in result.stderr and "bot_id" in result.stderr

    def test_bad_redis_url_is_a_usage_error(self) -> None:
        """A URL of another scheme exits 2 naming --redis-url."""
        result = invoke("http://localhost", "events", "publish", "user.x.y")
        assert result.exit_code == 2
        assert "'--redis-url'" in result.stderr

    def test_unreachable_redis_exits_1_with_advice(self) -> None:
        """No Redis: exit 1, one message with the redacted URL and what to do, no traceback."""
        url = unreachable_url(password="s3cret")
        result = invoke(url, "events", "publish", "user.x.y")
        assert result.exit_code == 1
        assert "cannot reach Redis at redis://:***@127.0.0.1:" in result.stderr
        assert "MULTIBOT_REDIS_URL" in result.stderr
        assert "s3cret" not in result.output and "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit)


@pytest.mark.redis
class TestPublish:
    def test_prints_id_and_writes_the_wire_entry(self, redis_url: str, sync_redis: Redis) -> None:
        """The printed id is the event's; the entry is on the routed stream in wire format."""
        result = invoke(
            redis_url, "events", "publish", "user.note.added", "--data", '{"n": 1}',
            "--key", "k1", "--correlation-id", "c1",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        event_id = result.stdout.strip()
        assert uuid.UUID(event_id).version == 7
        ((_, fields),) = entries(sync_redis, USER_STREAM)
        assert fields["wire"] == "1" and fields["id"] == event_id
        assert (fields["type"], fields["source"]) == ("user.note.added", "cli")
        assert (fields["key"], fields["correlation_id"]) == ("k1", "c1")
        assert orjson.loads(fields["data"]) == {"n": 1}

    def test_json_output_and_stdin_data(self, redis_url: str, sync_redis: Redis) -> None:
        """--data - reads stdin; --json prints id, stream and entry id; --source is kept."""
        result = invoke(
            redis_url, "events", "publish", "bot.job.done", "--data", "-", "--json",
            "--source", "ops", input='{"job": 7}',
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        out = orjson.loads(result.stdout)
        ((entry_id, fields),) = entries(sync_redis, BOT_STREAM)
        assert out == {
            "id": fields["id"], "type": "bot.job.done", "stream": BOT_STREAM, "entry_id": entry_id,
        }  # fmt: skip
        assert fields["source"] == "ops" and orjson.loads(fields["data"]) == {"job": 7}

    def test_namespace_from_the_environment(self, redis_url: str, sync_redis: Redis) -> None:
        """MULTIBOT_NAMESPACE prefixes the stream key."""
        env = {"MULTIBOT_REDIS_URL": redis_url, "MULTIBOT_NAMESPACE": "other"}
        result = CliRunner().invoke(main, ["events", "publish", "user.x.y"], env=env)
        assert result.exit_code == 0, result.output
        assert len(entries(sync_redis, Keys("other").stream("user"))) == 1
        assert entries(sync_redis, USER_STREAM) == []


class TailProcess:
    """``python -m manager.cli events tail …`` in a subprocess; a thread collects stderr."""

    def __init__(self, url: str, *args: str) -> None:
        env = {**os.environ, "MULTIBOT_REDIS_URL": url}
        env.pop("MULTIBOT_NAMESPACE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "manager.cli", "events", "tail", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def _take(self, timeout: float) -> str | None:
        line = self._lines.get(timeout=timeout)
        if line is not None:
            self.stderr.append(line)
        return line

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the tail printed its banner: it reads everything added from then on."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._take(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"tail printed no banner in {timeout}s") from None
            if line is None:
                raise AssertionError(f"tail ended before its banner: {''.join(self.stderr)}")
            if line.startswith("Tailing "):
                return

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        """Wait for the tail to exit; return its exit code, stdout and stderr."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"tail still running after {timeout}s") from None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()
        self._reader.join(timeout)
        while not self._lines.empty():
            self._take(0)
        return code, stdout, "".join(self.stderr)

    def close(self) -> None:
        """Kill the tail if it still runs and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def tail(redis_url: str) -> Iterator[Callable[..., TailProcess]]:
    """Start ``multibot events tail ARGS`` against the test's Redis; all are ended after."""
    started: list[TailProcess] = []

    def start(*args: str) -> TailProcess:
        process = TailProcess(redis_url, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.mark.redis
class TestTail:
    def test_prints_events_published_after_it_started(
        self, redis_url: str, tail: Callable[..., TailProcess]
    ) -> None:
        """Events matching the pattern, on any of its streams, print as JSON lines; --count ends."""
        publish(redis_url, "user.old.event", {"n": 0})  # before the tail: not shown
        watch = tail("#", "--count", "2", "--json")
        watch.wait_ready()
        first = publish(redis_url, "user.note.added", {"n": 1})
        second = publish(redis_url, "bot.job.done", {"n": 2})
        code, stdout, stderr = watch.finish()
        assert code == 0, stderr
        lines = [orjson.loads(line) for line in stdout.splitlines()]
        assert [(e["id"], e["type"], e["data"]) for e in lines] == [
            (first, "user.note.added", {"n": 1}),
            (second, "bot.job.done", {"n": 2}),
        ]
        assert lines[0]["stream"] == USER_STREAM and lines[0]["source"] == "cli"

    def test_is_an_observer(
        self, redis_url: str, sync_redis: Redis, tail: Callable[..., TailProcess]
    ) -> None:
        """A tail creates no consumer group and filters by pattern and --where."""
        publish(redis_url, "user.note.added", {"n": 0})  # the stream exists: groups could go on it
        watch = tail("user.note.*", "--where", '{"n": {"gte": 2}}', "--count", "1")
        watch.wait_ready()
        publish(redis_url, "user.other.added", {"n": 5})
        publish(redis_url, "user.note.added", {"n": 1})
        shown = publish(redis_url, "user.note.added", {"n": 2})
        code, stdout, stderr = watch.finish()
        assert code == 0, stderr
        (line,) = stdout.splitlines()
        assert f"  user.note.added  cli  {shown}  " in line and line.endswith('{"n":2}')
        assert sync_redis.xinfo_groups(USER_STREAM) == []

    def test_since_prints_history_then_follows(
        self, redis_url: str, tail: Callable[..., TailProcess]
    ) -> None:
        """--since 0 prints what Redis holds, in order, then new events: none twice or missed."""
        old = [publish(redis_url, "user.note.added", {"n": n}) for n in range(2)]
        old.append(publish(redis_url, "system.job.done", {"n": 2}))
        watch = tail("#", "--since", "0", "--count", "4", "--json")
        watch.wait_ready()
        new = publish(redis_url, "user.note.added", {"n": 3})
        code, stdout, stderr = watch.finish()
        assert code == 0, stderr
        assert [orjson.loads(line)["id"] for line in stdout.splitlines()] == [*old, new]

    def test_ctrl_c_exits_quietly(self, tail: Callable[..., TailProcess]) -> None:
        """SIGINT ends a tail with exit code 0 and no traceback."""
        watch = tail("user.#")
        watch.wait_ready()
        watch.proc.send_signal(signal.SIGINT)
        code, stdout, stderr = watch.finish()
        assert (code, stdout) == (0, "")
        assert "Traceback" not in stderr


class TestTailOptions:
    def test_bad_pattern_and_where_are_usage_errors(self) -> None:
        """A malformed pattern or --where exits 2 before connecting."""
        url = unreachable_url()
        assert invoke(url, "events", "tail", "User.#").exit_code == 2
        result = invoke(url, "events", "tail", "user.#", "--where", '{"n": {"gt": 1, "bogus": 2}}')
        assert result.exit_code == 2 and "unknown operator" in result.stderr
        result = invoke(url, "events", "tail", "user.#", "--since", "yesterday")
        assert result.exit_code == 2 and "'--since'" in result.stderr

    def test_now_and_ids(self) -> None:
        """'now' means new events only; stream ids pass through as they are."""
        assert _since_id("now") is None
        assert _since_id("0") == "0"
        assert _since_id("1700000000000-5") == "1700000000000-5"

    def test_times_are_utc_when_naive(self) -> None:
        """An ISO time becomes its millisecond's first id; no offset means UTC."""
        assert _since_id("2026-01-01T00:00:00Z") == "1767225600000-0"
        assert _since_id("2026-01-01T00:00:00") == "1767225600000-0"
        assert _since_id("2026-01-01T01:00:00+01:00") == "1767225600000-0"

    def test_durations_count_back_from_now(self) -> None:
        """'10m' starts ten minutes ago."""
        since = _since_id("10m")
        assert since is not None
        ago = time.time() - int(since.split("-")[0]) / 1000
        assert 599 < ago < 610

    def test_anything_else_is_refused(self) -> None:
        """Unparseable values are a usage error listing the accepted forms."""
        with pytest.raises(click.BadParameter, match="duration"):
            _since_id("yesterday")


@dataclass(frozen=True)
class Letter:
    """A dead letter a test created, and the event in it."""

    id: str
    event: Event
    group: str
    reason: DeadLetterReason


async def add_letters(url: str) -> list[Letter]:
    """Dead-letter three events: two of group a (user stream), one of group b (bot stream)."""
    specs = [
        ("user.note.added", "bot-group-a", DeadLetterReason.HANDLER_ERROR),
        ("bot.job.done", "bot-group-b", DeadLetterReason.SCHEMA),
        ("user.note.added", "bot-group-a", DeadLetterReason.POISON),
    ]
    letters = []
    async with redis_client(url, decode_responses=True) as client:
        dead = DeadLetters(client, KEYS)
        for n, (type_, group, reason) in enumerate(specs):
            event = Event(type=type_, data={"n": n}, source="test")
            fields = {k: v if isinstance(v, str) else v.decode() for k, v in encode(event).items()}
            dlq_id = await dead.add(
                fields=fields, reason=reason, error=f"ValueError: cannot handle {n} " * 10,
                stream=KEYS.stream(type_.split(".")[0]), entry_id=f"1-{n}", group=group,
                consumer=f"{group}-0", handler="handle", attempts=3,
                traceback=f"Traceback (most recent call last):\nValueError: cannot handle {n}",
            )  # fmt: skip
            letters.append(Letter(dlq_id, event, group, reason))
    return letters


@pytest.fixture
async def letters(redis_url: str) -> list[Letter]:
    """Three dead letters on the test's Redis."""
    return await add_letters(redis_url)


def dlq_ids(client: Redis) -> list[str]:
    """The ids left on the dead-letter stream."""
    return [entry_id for entry_id, _ in entries(client, KEYS.dead_letters())]


@pytest.mark.redis
class TestDlqList:
    def test_table(self, redis_url: str, letters: list[Letter]) -> None:
        """One row per dead letter, oldest first, with type and a one-line cut error."""
        result = invoke(redis_url, "dlq", "list")
        assert result.exit_code == 0, result.output
        header, *rows = result.stdout.splitlines()
        assert header.split() == ["ID", "FAILED_AT", "REASON", "GROUP", "HANDLER", "TYPE", "ERROR"]
        assert [row.split()[0] for row in rows] == [letter.id for letter in letters]
        assert rows[1].split()[2:6] == ["schema", "bot-group-b", "handle", "bot.job.done"]
        assert rows[0].endswith("…") and len(rows[0]) < 200

    def test_json_pages(self, redis_url: str, letters: list[Letter]) -> None:
        """--count cuts the list and says how to get the next page with --after."""
        first = invoke(redis_url, "dlq", "list", "--json", "--count", "2")
        assert first.exit_code == 0, first.output
        assert [d["id"] for d in orjson.loads(first.stdout)] == [letters[0].id, letters[1].id]
        assert f"--after {letters[1].id}" in first.stderr
        rest = invoke(redis_url, "dlq", "list", "--json", "--after", letters[1].id)
        (only,) = orjson.loads(rest.stdout)
        assert only["id"] == letters[2].id and only["fields"]["id"] == letters[2].event.id
        assert rest.stderr == ""

    def test_empty(self, redis_url: str) -> None:
        """No dead letters is said plainly (and is an empty array with --json)."""
        assert invoke(redis_url, "dlq", "list").stdout == "No dead letters.\n"
        assert orjson.loads(invoke(redis_url, "dlq", "list", "--json").stdout) == []


@pytest.mark.redis
class TestDlqShow:
    def test_shows_everything(self, redis_url: str, letters: list[Letter]) -> None:
        """Reason, group, handler, traceback and the original fields are all printed."""
        letter = letters[0]
        result = invoke(redis_url, "dlq", "show", letter.id)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert f"reason:    {letter.reason}" in out and "group:     bot-group-a" in out
        assert f"  id: {letter.event.id}" in out and '  data: {"n":0}' in out
        assert "  Traceback (most recent call last):" in out

    def test_json(self, redis_url: str, letters: list[Letter]) -> None:
        """--json prints the dead letter as one object, original fields included."""
        result = invoke(redis_url, "dlq", "show", letters[1].id, "--json")
        doc = orjson.loads(result.stdout)
        assert doc["id"] == letters[1].id and doc["reason"] == "schema"
        assert doc["fields"]["type"] == "bot.job.done" and doc["attempts"] == 3

    def test_unknown_and_malformed_ids(self, redis_url: str) -> None:
        """An id that is not there exits 1; one that is not an id exits 2."""
        result = invoke(redis_url, "dlq", "show", "1-1")
        assert result.exit_code == 1 and "not found: 1-1" in result.stderr
        assert invoke(redis_url, "dlq", "show", "latest").exit_code == 2


@pytest.mark.redis
class TestDlqRetry:
    def test_retry_redelivers_to_the_origin_stream(
        self, redis_url: str, sync_redis: Redis, letters: list[Letter]
    ) -> None:
        """The event goes back on its stream for its group and handler, and leaves the DLQ."""
        letter = letters[0]
        result = invoke(redis_url, "dlq", "retry", letter.id)
        assert result.exit_code == 0, result.output
        dlq_id, arrow, stream, new_id = result.stdout.split()
        assert (dlq_id, arrow, stream) == (letter.id, "->", USER_STREAM)
        ((entry_id, fields),) = entries(sync_redis, USER_STREAM)
        assert entry_id == new_id and fields["id"] == letter.event.id
        assert (fields["target"], fields["dlq_id"]) == ("bot-group-a/handle", letter.id)
        assert dlq_ids(sync_redis) == [letters[1].id, letters[2].id]

    def test_retry_all_with_filters(
        self, redis_url: str, sync_redis: Redis, letters: list[Letter]
    ) -> None:
        """--all --group retries only that group's dead letters; --json lists them."""
        result = invoke(redis_url, "dlq", "retry", "--all", "--group", "bot-group-a", "--json")
        assert result.exit_code == 0, result.output
        done = orjson.loads(result.stdout)
        assert [d["dlq_id"] for d in done] == [letters[0].id, letters[2].id]
        assert dlq_ids(sync_redis) == [letters[1].id]
        result = invoke(redis_url, "dlq", "retry", "--all", "--reason", "poison")
        assert result.stdout == "No dead letters to retry.\n"

    def test_unknown_id_exits_1_after_retrying_the_others(
        self, redis_url: str, sync_redis: Redis, letters: list[Letter]
    ) -> None:
        """Known ids are retried; the unknown one is named and the exit code is 1."""
        result = invoke(redis_url, "dlq", "retry", letters[1].id, "1-1")
        assert result.exit_code == 1
        assert result.stdout.startswith(f"{letters[1].id} -> {BOT_STREAM} ")
        assert "not found: 1-1" in result.stderr
        assert len(entries(sync_redis, BOT_STREAM)) == 1

    async def test_a_letter_naming_another_key_is_refused_and_kept(
        self, redis_url: str, sync_redis: Redis, letters: list[Letter]
    ) -> None:
        """--all retries the genuine letters; one planted with another bot's key as its
        stream is refused with the reason, stays, and nothing is written there (exit 1)."""
        state = f"{KEYS.namespace}:state:{{b}}"
        async with redis_client(redis_url, decode_responses=True) as client:
            forged = await DeadLetters(client, KEYS).add(
                fields={"id": "e9", "type": "user.note.added", "data": "{}"},
                reason=DeadLetterReason.HANDLER_ERROR, error="planted", stream=state,
                entry_id="1-9", group="bot-group-a", consumer="bot-group-a-0",
            )  # fmt: skip
        result = await asyncio.to_thread(invoke, redis_url, "dlq", "retry", "--all")
        assert result.exit_code == 1
        assert f"dead letter {forged} names stream '{state}'" in result.stderr
        assert "not retried, the letter is kept" in result.stderr
        assert len(result.stdout.splitlines()) == len(letters)
        assert dlq_ids(sync_redis) == [forged]
        assert sync_redis.exists(state) == 0

    def test_needs_ids_or_all(self, redis_url: str) -> None:
        """Neither ids nor --all, both, or filters with ids, are usage errors."""
        assert invoke(redis_url, "dlq", "retry").exit_code == 2
        assert invoke(redis_url, "dlq", "retry", "1-1", "--all").exit_code == 2
        result = invoke(redis_url, "dlq", "retry", "1-1", "--group", "g")
        assert result.exit_code == 2 and "narrow --all" in result.stderr


@pytest.mark.redis
class TestDlqPurge:
    def test_purge_ids(self, redis_url: str, sync_redis: Redis, letters: list[Letter]) -> None:
        """Named dead letters are deleted without a question."""
        result = invoke(redis_url, "dlq", "purge", letters[0].id, letters[2].id)
        assert (result.exit_code, result.stdout) == (0, "Purged 2 dead letter(s).\n")
        assert dlq_ids(sync_redis) == [letters[1].id]

    def test_unknown_id_exits_1(
        self, redis_url: str, sync_redis: Redis, letters: list[Letter]
    ) -> None:
        """An unknown id is named, exit 1; the known ones are still purged."""
        result = invoke(redis_url, "dlq", "purge", "1-1", letters[0].id)
        assert result.exit_code == 1 and "not found: 1-1" in result.stderr
        assert dlq_ids(sync_redis) == [letters[1].id, letters[2].id]

    def test_all_asks_first(self, redis_url: str, sync_redis: Redis, letters: list[Letter]) -> None:
        """--all asks for confirmation: no keeps everything, yes deletes everything."""
        refused = invoke(redis_url, "dlq", "purge", "--all", input="n\n")
        assert refused.exit_code == 1
        assert "Delete all 3 dead letters of namespace 'multibot'?" in refused.output
        assert len(dlq_ids(sync_redis)) == 3
        accepted = invoke(redis_url, "dlq", "purge", "--all", input="y\n")
        assert accepted.exit_code == 0 and "Purged 3 dead letter(s)." in accepted.stdout
        assert dlq_ids(sync_redis) == []

    def test_all_with_yes_does_not_ask(
        self, redis_url: str, sync_redis: Redis, letters: list[Letter]
    ) -> None:
        """--yes skips the question."""
        result = invoke(redis_url, "dlq", "purge", "--all", "--yes")
        assert (result.exit_code, result.output) == (0, "Purged 3 dead letter(s).\n")
        assert dlq_ids(sync_redis) == []
