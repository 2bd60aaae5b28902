"""Tests for the bot runtime's pieces: the status protocol (bus.supervision), the status
pipe's writer (bots.runtime.status) and entry point loading (bots.runtime.entry)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from bots import chatbot
from bots.runtime.entry import EntryPointError, load_main
from bots.runtime.status import MAX_BUFFER, StatusChannel
from bus.event import Event
from bus.metrics import BusMetrics
from bus.settings import BusSettings
from bus.supervision import RuntimeSpec, Status, StatusLine, describe, spec_json
from tests.support import wait_until

STREAM = "multibot:stream:{user}"
OTHER = "multibot:stream:{bot}"

EVERY_KIND = [
    StatusLine(Status.HEARTBEAT),
    StatusLine(Status.READY),
    StatusLine(Status.STANDBY),
    StatusLine(Status.ACTIVE, token=7),
    StatusLine(Status.STARTED, STREAM, ("1700000000000-0",)),
    StatusLine(Status.FINISHED, STREAM, ("1700000000000-0", "1700000000001-3")),
    StatusLine(Status.METRICS, data={"counters": {"published": {"": {"user": 2}}}}),
    StatusLine(Status.GROUPS, "$", (STREAM, OTHER)),
]


def delivered(entry_id: str, stream: str = STREAM) -> Event:
    """An event as read from ``stream`` at ``entry_id``."""
    return Event("user.message.received", {}, "test").with_delivery(stream, entry_id)


class Pipe:
    """A real pipe: the channel writes ``write``; the test reads ``read`` without blocking."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)
        self._open = {self.read, self.write}

    def drain(self) -> bytes:
        """Everything in the pipe now (b"" if nothing)."""
        data = b""
        while True:
            try:
                chunk = os.read(self.read, 1 << 16)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def fill(self) -> int:
        """Write until the pipe is full (the manager is not reading); the bytes written."""
        os.set_blocking(self.write, False)
        written = 0
        for size in (4096, 1):
            while True:
                try:
                    written += os.write(self.write, b"x" * size)
                except BlockingIOError:
                    break
        return written

    def close(self, fd: int) -> None:
        """Close one end (once)."""
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def close_all(self) -> None:
        """Close both ends."""
        for fd in list(self._open):
            self.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    """A pipe closed at teardown."""
    made = Pipe()
    try:
        yield made
    finally:
        made.close_all()


def spec_fields(**extra: object) -> dict[str, object]:
    """The fields of a valid RuntimeSpec, plus ``extra``."""
    return {
        "bot_id": "greeter",
        "instance": 0,
        "entry": "bots.chatbot:main",
        "bus": {"redis_url": "redis://greeter:s3cret@127.0.0.1:6379/0"},
        **extra,
    }


class TestStatusLine:
    @pytest.mark.parametrize("line", EVERY_KIND, ids=[str(line.kind) for line in EVERY_KIND])
    def test_round_trip(self, line: StatusLine) -> None:
        """Every kind of line parses back to itself from its encoding."""
        encoded = line.encode()
        assert encoded.endswith(b"\n")
        assert encoded.count(b"\n") == 1
        assert StatusLine.parse(encoded) == line

    def test_encodings(self) -> None:
        """The lines are the documented short words."""
        assert [line.encode() for line in EVERY_KIND] == [
            b"hb\n",
            b"ready\n",
            b"standby\n",
            b"active 7\n",
            b"+ multibot:stream:{user} 1700000000000-0\n",
            b"- multibot:stream:{user} 1700000000000-0 1700000000001-3\n",
            b'm {"counters":{"published":{"":{"user":2}}}}\n',
            b"groups $ multibot:stream:{user} multibot:stream:{bot}\n",
        ]

    @pytest.mark.parametrize(
        "line",
        [
            b"",
            b"\n",
            b"   \n",
            b"hello world\n",
            b"HB\n",
            b"\xff\xfe\n",
            b"+\n",
            b"+ stream\n",
            b"- stream\n",
            b"active\n",
            b"active x\n",
            b"active -1\n",
            b"active 1 2\n",
            b'{"event": "a log line"}\n',
            b"m\n",
            b"m {not json\n",
            b"m [1, 2]\n",
            b"groups\n",
            b"groups $\n",
        ],
    )
    def test_garbage_and_short_lines_are_none(self, line: bytes) -> None:
        """A line that is not a complete status line is ignored (None)."""
        assert StatusLine.parse(line) is None

    def test_parse_without_newline(self) -> None:
        """A last line without its newline still parses."""
        assert StatusLine.parse(b"ready") == StatusLine(Status.READY)


class TestRuntimeSpec:
    def test_unknown_fields_are_refused(self) -> None:
        """A spec with a field the runtime does not know is an error, not ignored."""
        with pytest.raises(ValidationError, match="colour"):
            RuntimeSpec.model_validate(spec_fields(colour="blue"))

    def test_unknown_bus_fields_are_refused(self) -> None:
        """Unknown keys inside the bus settings are refused too."""
        with pytest.raises(ValidationError, match="colour"):
            RuntimeSpec.model_validate(spec_fields(bus={"colour": "blue"}))

    def test_json_round_trip(self) -> None:
        """spec_json is what the runtime reads back from stdin."""
        spec = RuntimeSpec.model_validate(spec_fields(status_fd=5, lease_ttl=2.0))
        assert RuntimeSpec.model_validate_json(spec_json(spec)) == spec
        assert isinstance(spec.bus, BusSettings)

    def test_describe_leaves_out_credentials(self) -> None:
        """describe() gives the bot, instance and entry, never the Redis URL."""
        spec = RuntimeSpec.model_validate(spec_fields())
        assert describe(spec) == {"bot_id": "greeter", "instance": 0, "entry": "bots.chatbot:main"}
        assert "s3cret" not in repr(describe(spec))


class TestStatusChannel:
    async def test_started_is_written_at_once(self, pipe: Pipe) -> None:
        """A handler's start is on the pipe before started() returns, one line per stream."""
        channel = StatusChannel(pipe.write)
        channel.started([delivered("1-0"), delivered("2-0"), delivered("1-0", OTHER)])
        assert pipe.drain() == (f"+ {STREAM} 1-0 2-0\n".encode() + f"+ {OTHER} 1-0\n".encode())

    async def test_events_without_a_delivery_are_skipped(self, pipe: Pipe) -> None:
        """Events not read from a stream report nothing."""
        channel = StatusChannel(pipe.write)
        channel.started([Event("user.message.received", {}, "test")])
        assert pipe.drain() == b""

    async def test_finished_is_coalesced_into_one_write_per_iteration(self, pipe: Pipe) -> None:
        """Ends wait for the next loop iteration, then go out together."""
        channel = StatusChannel(pipe.write)
        channel.finished([delivered("1-0")])
        channel.finished([delivered("2-0")])
        channel.finished([delivered("3-0", OTHER)])
        assert pipe.drain() == b""
        await asyncio.sleep(0)  # one loop iteration: the flush scheduled first runs first
        assert pipe.drain() == (f"- {STREAM} 1-0\n- {STREAM} 2-0\n- {OTHER} 3-0\n".encode())
        await asyncio.sleep(0)
        assert pipe.drain() == b""

    async def test_a_start_carries_earlier_ends_with_it(self, pipe: Pipe) -> None:
        """A start written at once also writes the ends queued before it, in order."""
        channel = StatusChannel(pipe.write)
        channel.finished([delivered("1-0")])
        channel.started([delivered("2-0")])
        assert pipe.drain() == f"- {STREAM} 1-0\n+ {STREAM} 2-0\n".encode()
        await asyncio.sleep(0)
        assert pipe.drain() == b""

    async def test_full_pipe_never_blocks_and_keeps_the_buffer(self, pipe: Pipe) -> None:
        """With the manager not reading, sends return at once; the lines go out later."""
        channel = StatusChannel(pipe.write)
        filled = pipe.fill()
        channel.started([delivered("1-0")])
        channel.send(StatusLine(Status.HEARTBEAT))
        assert pipe.drain() == b"x" * filled
        channel.flush()
        assert pipe.drain() == f"+ {STREAM} 1-0\nhb\n".encode()
        assert not channel.closed.is_set()

    async def test_buffer_past_max_is_dropped_with_a_warning(self, pipe: Pipe) -> None:
        """Past MAX_BUFFER unsent bytes the buffer is dropped, with one warning."""
        channel = StatusChannel(pipe.write)
        filled = pipe.fill()
        ids = tuple(f"{n}-0" for n in range(MAX_BUFFER // 8 + 1))
        with capture_logs() as logs:
            channel.send(StatusLine(Status.STARTED, STREAM, ids))
            channel.send(StatusLine(Status.STARTED, STREAM, ids))
        assert [(log["log_level"], log["event"]) for log in logs] == [
            ("warning", "the manager reads no status; dropping in-flight reports")
        ]
        assert pipe.drain() == b"x" * filled
        channel.send(StatusLine(Status.HEARTBEAT))
        assert pipe.drain() == b"hb\n"

    async def test_overflow_keeps_lines_whole(self, pipe: Pipe) -> None:
        """After an overflow the pipe still carries whole lines: the next line reads alone."""
        channel = StatusChannel(pipe.write)
        events = [delivered(f"{n}-0") for n in range(MAX_BUFFER // 4)]
        with capture_logs():
            channel.started(events)
        channel.send(StatusLine(Status.HEARTBEAT))
        data = pipe.drain()
        for _ in range(100):  # the manager reads again: the rest comes out
            channel.flush()
            more = pipe.drain()
            if not more:
                break
            data += more
        lines = data.splitlines(keepends=True)
        assert all(line.endswith(b"\n") and StatusLine.parse(line) for line in lines)
        assert StatusLine.parse(lines[-1]) == StatusLine(Status.HEARTBEAT)

    async def test_closed_read_end_sets_closed(self, pipe: Pipe) -> None:
        """When the manager's end is closed the channel says so and stops writing."""
        channel = StatusChannel(pipe.write)
        pipe.close(pipe.read)
        with capture_logs() as logs:
            channel.started([delivered("1-0")])
        assert channel.closed.is_set()
        assert [log["event"] for log in logs] == ["status pipe closed: the manager is gone"]
        with capture_logs() as later:
            channel.send(StatusLine(Status.HEARTBEAT))
        assert later == []

    async def test_no_pipe_does_nothing(self) -> None:
        """A bot run by hand (no status fd) may call everything; nothing happens."""
        channel = StatusChannel(None)
        channel.started([delivered("1-0")])
        channel.finished([delivered("1-0")])
        channel.send(StatusLine(Status.READY))
        channel.flush()
        await asyncio.sleep(0)
        assert not channel.closed.is_set()

    async def test_metrics_are_sent_when_they_changed(self, pipe: Pipe) -> None:
        """A metrics snapshot goes out at once, and again only after something was counted."""
        channel = StatusChannel(pipe.write)
        metrics = BusMetrics()
        channel.send_metrics(metrics)
        metrics.published("user.x.y")
        channel.send_metrics(metrics)
        channel.send_metrics(metrics)
        lines = pipe.drain().splitlines(keepends=True)
        assert [StatusLine.parse(line) for line in lines] == [
            StatusLine(Status.METRICS, data={"counters": {}, "histograms": {}}),
            StatusLine(Status.METRICS, data=metrics.snapshot()),
        ]

    async def test_metrics_reports_repeat(self, pipe: Pipe) -> None:
        """metrics_reports() reports every interval what changed meanwhile."""
        channel = StatusChannel(pipe.write)
        metrics = BusMetrics()
        received = bytearray()

        def published() -> int | None:
            received.extend(pipe.drain())
            lines = [StatusLine.parse(bytes(line)) for line in received.splitlines()]
            last = lines[-1] if lines else None
            if last is None or last.data is None:
                return None
            return int(last.data["counters"].get("published", {}).get("", {}).get("user", 0))

        task = asyncio.create_task(channel.metrics_reports(metrics, 0.01))
        try:
            await wait_until(lambda: published() == 0, timeout=5, what="a first report")
            metrics.published("user.x.y")
            await wait_until(lambda: published() == 1, timeout=5, what="the new count")
        finally:
            task.cancel()

    async def test_heartbeats_repeat(self, pipe: Pipe) -> None:
        """heartbeats() sends a heartbeat line every interval until cancelled."""
        channel = StatusChannel(pipe.write)
        received = bytearray()

        def beats() -> int:
            received.extend(pipe.drain())
            return received.count(b"hb\n")

        task = asyncio.create_task(channel.heartbeats(0.01))
        try:
            await wait_until(lambda: beats() >= 3, timeout=5, what="three heartbeats")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert set(bytes(received).splitlines()) == {b"hb"}


class TestLoadMain:
    def test_returns_the_coroutine_function(self) -> None:
        """An entry point names the bot's async main, which is returned as is."""
        assert load_main("bots.chatbot:main") is chatbot.main

    def test_function_defaults_to_main(self) -> None:
        """An entry without ':function' means main."""
        assert load_main("bots.chatbot") is chatbot.main

    def test_missing_module(self) -> None:
        """A module that does not import says which, and what to check."""
        with pytest.raises(EntryPointError) as caught:
            load_main("bots.no_such_bot:main")
        message = str(caught.value)
        assert "cannot import 'bots.no_such_bot'" in message
        assert "entry point 'bots.no_such_bot:main'" in message
        assert "check the bot's `entry`" in message
        assert isinstance(caught.value.__cause__, ImportError)

    def test_missing_dependency_of_the_module(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A module whose own import fails is reported with the missing name."""
        (tmp_path / "bot_needing_dep.py").write_text("import no_such_dependency_xyz\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(EntryPointError, match="no_such_dependency_xyz"):
            load_main("bot_needing_dep:main")

    def test_missing_function(self) -> None:
        """A module without the named function says what it lacks."""
        with pytest.raises(
            EntryPointError,
            match=r"bots\.chatbot has no `async def nope\(bus\)` "
            r"\(entry point 'bots\.chatbot:nope'\)",
        ):
            load_main("bots.chatbot:nope")

    def test_non_async_function(self) -> None:
        """A plain (not async) function is refused like a missing one."""
        assert callable(chatbot.answer)
        with pytest.raises(EntryPointError, match=r"has no `async def answer\(bus\)`"):
            load_main("bots.chatbot:answer")

    def test_non_function_attribute(self) -> None:
        """A name that is not a function at all is refused."""
        with pytest.raises(EntryPointError, match=r"has no `async def log\(bus\)`"):
            load_main("bots.chatbot:log")

    def test_module_with_a_syntax_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bot module that cannot be compiled is an unusable entry point."""
        (tmp_path / "broken_bot_syntax.py").write_text("async def main(bus):\n    return (\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(EntryPointError):
            load_main("broken_bot_syntax:main")
