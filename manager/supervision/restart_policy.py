"""When to start an exited bot process again: backoff and crash-loop detection. Pure policy.

The supervisor reports each exit with the time and how long the process ran; the tracker
answers with a decision. No clocks and no sleeping here: the supervisor does both.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass

from bus.backoff import Backoff
from bus.supervision import EXIT_CONFIG
from manager.config import RestartPolicy


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """asyncio's returncode: negative for a signal."""
        return cls(signal=-returncode) if returncode < 0 else cls(code=returncode)

    @property
    def failed(self) -> bool:
        """A signal or a non-zero code."""
        return self.signal is not None or self.code != 0

    @property
    def signal_name(self) -> str | None:
        """``SIGKILL`` etc., or None."""
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def __str__(self) -> str:
        return f"killed by {self.signal_name}" if self.signal is not None else f"exit {self.code}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an exit."""

    #: Start the process again after ``delay`` seconds.
    restart: bool
    delay: float = 0.0
    #: Give up: the bot is failed (crash loop, or it cannot start at all).
    failed: bool = False
    reason: str = ""


class RestartTracker:
    """Exponential backoff and crash-loop detection for one bot instance."""

    def __init__(self, policy: RestartPolicy, backoff: Backoff | None = None) -> None:
        self.policy = policy
        self._backoff = backoff or Backoff(policy.backoff_base, policy.backoff_cap, jitter=0.2)
        self._restarts: deque[float] = deque()
        self._attempt = 0
        #: Restarts so far (for status).
        self.restarts = 0

    def on_exit(
        self, status: ExitStatus, *, now: float, ran_for: float, forced: bool = False
    ) -> Decision:
        """The decision after the process ended with ``status`` having run ``ran_for`` s.

        ``forced``: the manager stopped it to replace it (over its memory limit): it is
        restarted whatever the policy, and counts towards the crash loop like a failure.
        """
        if status.code == EXIT_CONFIG:
            return Decision(False, failed=True, reason="it cannot start: see its log")
        if not forced and (
            self.policy.policy == "never"
            or (self.policy.policy == "on-failure" and not status.failed)
        ):
            return Decision(False, reason=f"{status}; restart policy is {self.policy.policy}")
        window = self.policy.crash_loop_window
        while self._restarts and self._restarts[0] <= now - window:
            self._restarts.popleft()
        if len(self._restarts) >= self.policy.crash_loop_restarts:
            return Decision(
                False,
                failed=True,
                reason=(
                    f"crash loop: {len(self._restarts) + 1} exits within {window:g}s "
                    f"(last: {status}); not restarting: fix the bot and run "
                    "`multibot restart <bot>`"
                ),
            )
        self._attempt = 1 if ran_for >= self.policy.reset_after else self._attempt + 1
        self._restarts.append(now)
        self.restarts += 1
        return Decision(True, delay=self._backoff.delay(self._attempt), reason=str(status))

    def reset(self) -> None:
        """Forget past exits (an operator restarted the bot by hand)."""
        self._restarts.clear()
        self._attempt = 0
