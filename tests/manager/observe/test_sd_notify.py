"""Tests for manager.observe.sd_notify: the datagrams systemd receives on a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from manager.observe.sd_notify import NOTIFY_ENV_KEYS, Notifier
from tests.support import in_background, wait_until

FAST_WATCHDOG_USEC = "100000"  # 0.1 s timeout, so a ping every 0.05 s


class Listener:
    """The service manager's end: a bound unix datagram socket that collects notifications."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        #: What to put in NOTIFY_SOCKET to reach this listener.
        self.address = address
        self.received: list[bytes] = []

    def drain(self) -> list[bytes]:
        """Move every queued datagram into ``received`` without blocking; return ``received``."""
        while True:
            try:
                self.received.append(self.sock.recv(4096))
            except BlockingIOError:
                return self.received

    def env(self, **extra: str) -> dict[str, str]:
        """An environment as systemd would pass it, pointing at this listener."""
        return {"NOTIFY_SOCKET": self.address, **extra}


def _listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A notification socket bound to a path in tmp_path."""
    path = str(tmp_path / "notify")
    with _listen(path) as sock:
        yield Listener(sock, path)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A notification socket in the abstract namespace (``@name``), as systemd uses in tests."""
    name = f"multibot-test-{uuid.uuid4().hex}"
    with _listen("\0" + name) as sock:
        yield Listener(sock, "@" + name)


@contextlib.asynccontextmanager
async def running_watchdog(notifier: Notifier) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``notifier.watchdog_loop()`` for the block, then cancel it and check it ended."""
    async with in_background(notifier.watchdog_loop()) as task:
        yield task
    assert task.cancelled(), "watchdog_loop ended on its own instead of running until cancel"


class TestFromEnv:
    def test_no_notify_socket_disables_everything(self) -> None:
        """Without NOTIFY_SOCKET every call is a no-op that returns False."""
        notifier = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
        assert not notifier.enabled
        assert notifier.socket_path is None
        assert notifier.watchdog_interval is None
        assert not notifier.ready("up")
        assert not notifier.stopping()
        assert not notifier.reloading()
        assert not notifier.status("x")
        assert not notifier.watchdog()
        assert not notifier.extend_timeout(5)
        assert repr(notifier) == "<Notifier disabled>"

    def test_empty_notify_socket_disables(self) -> None:
        """An empty NOTIFY_SOCKET counts as unset."""
        assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled

    def test_unsupported_socket_is_logged_and_disabled(self) -> None:
        """A NOTIFY_SOCKET that is neither a path nor @name (vsock:) is logged and ignored."""
        with capture_logs() as logs:
            notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert not notifier.enabled
        assert logs[0]["event"] == "sd_notify.unsupported_socket"
        assert logs[0]["log_level"] == "warning"

    def test_watchdog_interval_is_half_the_timeout(self, listener: Listener) -> None:
        """WATCHDOG_USEC=30000000 (WatchdogSec=30) gives a ping every 15 s."""
        notifier = Notifier.from_env(listener.env(WATCHDOG_USEC="30000000"))
        assert notifier.watchdog_interval == 15.0
        assert repr(notifier) == f"<Notifier socket={listener.address} watchdog=every 15s>"

    def test_watchdog_pid_equal_to_ours_enables(self, listener: Listener) -> None:
        """WATCHDOG_PID naming this process (the default pid) keeps the watchdog on."""
        env = listener.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid()))
        assert Notifier.from_env(env).watchdog_interval == 1.0
        assert Notifier.from_env(env | {"WATCHDOG_PID": "4242"}, pid=4242).watchdog_interval == 1.0

    def test_watchdog_pid_mismatch_disables_watchdog_only(self, listener: Listener) -> None:
        """WATCHDOG_PID of another process turns the watchdog off but not notifications."""
        env = listener.env(WATCHDOG_USEC="2000000", WATCHDOG_PID="4242")
        with capture_logs() as logs:
            notifier = Notifier.from_env(env, pid=4243)
        assert notifier.watchdog_interval is None
        assert notifier.enabled
        assert logs[0]["event"] == "sd_notify.watchdog_not_ours"
        assert Notifier.from_env(env | {"WATCHDOG_PID": "x"}, pid=4243).watchdog_interval is None

    @pytest.mark.parametrize("value", ["", "abc", "0", "-5", "1.5"])
    def test_bad_watchdog_usec_is_logged_and_ignored(self, listener: Listener, value: str) -> None:
        """A WATCHDOG_USEC that is not a positive integer turns the watchdog off, with a warning."""
        with capture_logs() as logs:
            notifier = Notifier.from_env(listener.env(WATCHDOG_USEC=value))
        assert notifier.watchdog_interval is None
        assert [entry["event"] for entry in logs] == ["sd_notify.bad_watchdog_usec"]

    def test_watchdog_needs_a_socket(self) -> None:
        """WATCHDOG_USEC without NOTIFY_SOCKET gives no interval: the pings could go nowhere."""
        assert Notifier(None, watchdog_usec=2_000_000).watchdog_interval is None

    def test_constructor_rejects_relative_socket(self) -> None:
        """A relative socket path is a programming error, not something to ignore."""
        with pytest.raises(ValueError, match="path or @abstract"):
            Notifier("notify.sock")

    def test_env_keys_name_what_from_env_reads(self) -> None:
        """NOTIFY_ENV_KEYS lists the variables the supervisor must keep from bots."""
        assert set(NOTIFY_ENV_KEYS) == {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}


class TestMessages:
    def test_ready(self, listener: Listener) -> None:
        """ready() sends READY=1, with STATUS= when given."""
        notifier = Notifier.from_env(listener.env())
        assert notifier.ready()
        assert notifier.ready("3 bots running")
        assert listener.drain() == [b"READY=1", b"READY=1\nSTATUS=3 bots running"]

    def test_stopping_status_watchdog(self, listener: Listener) -> None:
        """stopping(), status() and watchdog() each send their single assignment."""
        notifier = Notifier.from_env(listener.env())
        assert notifier.stopping()
        assert notifier.status("stopping 2 bots")
        assert notifier.watchdog()
        assert listener.drain() == [b"STOPPING=1", b"STATUS=stopping 2 bots", b"WATCHDOG=1"]

    def test_reloading_carries_monotonic_time(self, listener: Listener) -> None:
        """reloading() sends RELOADING=1 and MONOTONIC_USEC= read from CLOCK_MONOTONIC."""
        notifier = Notifier.from_env(listener.env())
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        [datagram] = listener.drain()
        reloading, monotonic = datagram.decode().split("\n")
        assert reloading == "RELOADING=1"
        key, value = monotonic.split("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after

    def test_extend_timeout_in_microseconds(self, listener: Listener) -> None:
        """extend_timeout(seconds) sends EXTEND_TIMEOUT_USEC in whole microseconds."""
        notifier = Notifier.from_env(listener.env())
        assert notifier.extend_timeout(1.5)
        assert notifier.extend_timeout(90)
        assert listener.drain() == [b"EXTEND_TIMEOUT_USEC=1500000", b"EXTEND_TIMEOUT_USEC=90000000"]
        with pytest.raises(ValueError, match="positive"):
            notifier.extend_timeout(0)

    def test_newlines_cannot_inject_assignments(self, listener: Listener) -> None:
        """A newline in a status is flattened, so the text cannot smuggle in READY=1."""
        notifier = Notifier.from_env(listener.env())
        assert notifier.status("bad\nREADY=1\r\n")
        assert listener.drain() == [b"STATUS=bad READY=1"]

    def test_abstract_namespace_socket(self, abstract_listener: Listener) -> None:
        """NOTIFY_SOCKET=@name reaches the abstract-namespace socket named name."""
        notifier = Notifier.from_env(abstract_listener.env())
        assert notifier.socket_path == abstract_listener.address
        assert notifier.ready("up")
        assert notifier.watchdog()
        assert abstract_listener.drain() == [b"READY=1\nSTATUS=up", b"WATCHDOG=1"]

    def test_send_error_is_logged_not_raised(self, tmp_path: Path) -> None:
        """A socket nobody listens on makes the call return False and log a warning."""
        notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
        with capture_logs() as logs:
            assert not notifier.ready()
        assert logs[0]["event"] == "sd_notify.send_failed"
        assert logs[0]["log_level"] == "warning"
        assert logs[0]["message"] == "READY=1"
        assert isinstance(logs[0]["error"], FileNotFoundError)

    def test_full_queue_drops_instead_of_blocking(self, listener: Listener) -> None:
        """With the receiver's queue full a send fails at once (non-blocking) and is logged."""
        notifier = Notifier.from_env(listener.env())
        sent = 0
        with capture_logs() as logs:
            # The kernel queues at most net.unix.max_dgram_qlen (default 10) datagrams.
            while sent < 10_000 and notifier.watchdog():
                sent += 1
        assert 0 < sent < 10_000
        assert isinstance(logs[-1]["error"], BlockingIOError)
        assert len(listener.drain()) == sent


class TestWatchdogLoop:
    async def test_pings_repeatedly(self, listener: Listener) -> None:
        """The loop sends WATCHDOG=1 at once and then every interval until cancelled."""
        notifier = Notifier.from_env(listener.env(WATCHDOG_USEC=FAST_WATCHDOG_USEC))
        async with running_watchdog(notifier) as task:
            await wait_until(lambda: len(listener.drain()) >= 3, timeout=5, what="3 pings")
            assert not task.done()
        assert set(listener.received) == {b"WATCHDOG=1"}

    async def test_blocked_event_loop_delays_pings(self, listener: Listener) -> None:
        """While the event loop is blocked no ping goes out; the next follows once it is free."""
        notifier = Notifier.from_env(listener.env(WATCHDOG_USEC=FAST_WATCHDOG_USEC))
        async with running_watchdog(notifier):
            await wait_until(lambda: len(listener.drain()) >= 2, timeout=5, what="2 pings")
            # No await between these lines: the loop cannot run the watchdog task meanwhile.
            listener.drain()
            already = len(listener.received)
            time.sleep(0.5)  # noqa: ASYNC251 - blocking the event loop is what this test does
            assert len(listener.drain()) == already, "a ping went out while the loop was blocked"
            await wait_until(
                lambda: len(listener.drain()) > already, timeout=5, what="a ping after unblocking"
            )

    async def test_keeps_going_after_send_errors(self, tmp_path: Path) -> None:
        """Failed pings are logged and the loop carries on instead of dying."""
        env = {"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": FAST_WATCHDOG_USEC}
        notifier = Notifier.from_env(env)
        with capture_logs() as logs:
            async with running_watchdog(notifier) as task:
                await wait_until(
                    lambda: sum(e["event"] == "sd_notify.send_failed" for e in logs) >= 3,
                    timeout=5,
                    what="3 failed pings",
                )
                assert not task.done()

    @pytest.mark.parametrize(
        "env",
        [{}, {"WATCHDOG_USEC": "2000000"}, {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_PID": "1"}],
        ids=["no-socket", "no-socket-with-usec", "no-usec"],
    )
    async def test_returns_at_once_when_off(self, env: dict[str, str]) -> None:
        """Without a watchdog the loop returns instead of idling in the task group."""
        await asyncio.wait_for(Notifier.from_env(env).watchdog_loop(), timeout=5)
