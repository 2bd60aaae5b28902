"""Tell systemd how the manager is doing: the sd_notify protocol, without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket) and, with
``WatchdogSec=``, ``WATCHDOG_USEC``/``WATCHDOG_PID``. Each notification is one datagram of
newline-separated ``KEY=VALUE`` assignments (sd_notify(3)). Outside systemd ``NOTIFY_SOCKET``
is unset and every call is a no-op, so the manager calls these unconditionally.

The environment is read once, by ``Notifier.from_env(os.environ)`` at start-up. The
supervisor leaves the ``NOTIFY_ENV_KEYS`` out of the bots' environments: a bot must not
report readiness or feed the watchdog on the manager's behalf (and ``NotifyAccess=main``
makes systemd ignore it if it tries).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

#: The environment variables systemd sets for the protocol; bots must not inherit them.
NOTIFY_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends readiness, status, reload, stop and watchdog notifications to systemd.

    ``socket_path`` is a filesystem path or ``@name`` for the abstract namespace; None turns
    every method into a no-op. ``watchdog_usec`` is systemd's watchdog timeout (None: off).
    Methods return whether the datagram went out; a failed send is logged, never raised,
    because a monitoring hiccup must not take the supervisor down. Sends never block.
    """

    def __init__(self, socket_path: str | None = None, watchdog_usec: int | None = None) -> None:
        if socket_path is not None and not socket_path.startswith(("/", "@")):
            raise ValueError(f"NOTIFY_SOCKET must be a path or @abstract name, not {socket_path!r}")
        if watchdog_usec is not None and watchdog_usec <= 0:
            raise ValueError(f"watchdog_usec must be positive, not {watchdog_usec}")
        self._socket_path = socket_path or None
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Build a notifier from systemd's variables in ``env`` (pass ``os.environ``).

        The watchdog is on only when ``WATCHDOG_USEC`` is a positive integer and
        ``WATCHDOG_PID`` is absent or equals ``pid`` (default: this process), as
        sd_watchdog_enabled(3) decides. Values we cannot use are logged and ignored.
        """
        socket_path = env.get("NOTIFY_SOCKET") or None
        if socket_path is not None and not socket_path.startswith(("/", "@")):
            # systemd 253+ may also pass vsock: addresses (for VMs); we speak unix sockets only.
            log.warning("sd_notify.unsupported_socket", notify_socket=socket_path)
            socket_path = None
        return cls(socket_path, _watchdog_usec(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere (NOTIFY_SOCKET was set)."""
        return self._socket_path is not None

    @property
    def socket_path(self) -> str | None:
        """The socket notifications go to, as systemd spelled it; None when disabled."""
        return self._socket_path

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half systemd's timeout); None when it is off."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Report start-up (or a reload) finished, with an optional one-line status."""
        return self._send({"READY": "1"} | ({} if status is None else {"STATUS": status}))

    def stopping(self) -> bool:
        """Report that a graceful stop has begun."""
        return self._send({"STOPPING": "1"})

    def reloading(self) -> bool:
        """Report that a configuration reload (SIGHUP) has begun; call ``ready()`` when done.

        Carries ``MONOTONIC_USEC``, which ``Type=notify-reload`` (systemd 253+) requires to
        match the reload to the signal it sent.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send({"RELOADING": "1", "MONOTONIC_USEC": str(now_usec)})

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self._send({"STATUS": text})

    def watchdog(self) -> bool:
        """Ping the watchdog once; ``watchdog_loop`` does this on a timer."""
        return self._send({"WATCHDOG": "1"})

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start or stop timeout kills us.

        Send it again before that time runs out to keep extending (e.g. once per bot
        still stopping); it does not move the timeout nearer.
        """
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, not {seconds}")
        return self._send({"EXTEND_TIMEOUT_USEC": str(round(seconds * 1_000_000))})

    async def watchdog_loop(self) -> None:
        """Ping the watchdog every ``watchdog_interval`` until cancelled; return at once if off.

        The pings are sent from the event loop itself, so a loop blocked for longer than
        systemd's timeout misses them and systemd restarts the service, which is the point.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        log.debug("sd_notify.watchdog_started", interval=interval)
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def _send(self, fields: Mapping[str, str]) -> bool:
        if self._socket_path is None:
            return False
        # A newline inside a value would start a new assignment (a STATUS could say READY=1).
        message = "\n".join(f"{key}={' '.join(text.splitlines())}" for key, text in fields.items())
        address = "\0" + self._socket_path[1:] if self._socket_path[0] == "@" else self._socket_path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # a full queue at systemd drops the message, never stalls
                sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning(
                "sd_notify.send_failed", notify_socket=self._socket_path, message=message, error=exc
            )
            return False
        return True

    def __repr__(self) -> str:
        if self._socket_path is None:
            return "<Notifier disabled>"
        interval = self.watchdog_interval
        watchdog = "off" if interval is None else f"every {interval:g}s"
        return f"<Notifier socket={self._socket_path} watchdog={watchdog}>"


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC from ``env`` if the watchdog is meant for ``pid``, else None."""
    raw_usec, raw_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if raw_usec is None:
        return None
    if raw_pid is not None and _to_int(raw_pid) != pid:
        # Meant for another process (one that exec'd us or passed its environment on).
        log.info("sd_notify.watchdog_not_ours", watchdog_pid=raw_pid, pid=pid)
        return None
    usec = _to_int(raw_usec)
    if usec is None or usec <= 0:
        log.warning("sd_notify.bad_watchdog_usec", watchdog_usec=raw_usec)
        return None
    return usec


def _to_int(text: str) -> int | None:
    """``text`` as a decimal integer, None if it is not one."""
    try:
        return int(text)
    except ValueError:
        return None
