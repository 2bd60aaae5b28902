"""Tests for manager.supervision.restart_policy: restart decisions, backoff and crash
loops; no clocks."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from bus.backoff import Backoff
from bus.supervision import EXIT_CONFIG, EXIT_LEASE_LOST
from manager.config import RestartPolicy
from manager.supervision.restart_policy import Decision, ExitStatus, RestartTracker

CRASH = ExitStatus(code=1)
CLEAN = ExitStatus(code=0)
KILLED = ExitStatus(signal=signal.SIGKILL)


def tracker(**policy: Any) -> RestartTracker:
    """A tracker with exact (unjittered) delays 1, 2, 4, … capped at 8 s unless told."""
    settings = RestartPolicy.model_validate(
        {"backoff_base": 1.0, "backoff_cap": 8.0, "reset_after": 30.0, **policy}
    )
    return RestartTracker(settings, Backoff(settings.backoff_base, settings.backoff_cap, jitter=0))


def crash_times(
    restarts: RestartTracker, times: list[float], status: ExitStatus = CRASH
) -> list[Decision]:
    """The decisions for exits at ``times``, each after a short run."""
    return [restarts.on_exit(status, now=t, ran_for=1.0) for t in times]


class TestExitStatus:
    def test_from_returncode_exit_code(self) -> None:
        """A non-negative returncode is an exit code."""
        assert ExitStatus.from_returncode(3) == ExitStatus(code=3)
        assert ExitStatus.from_returncode(0) == ExitStatus(code=0)

    def test_from_returncode_signal(self) -> None:
        """A negative returncode is the signal that killed the process."""
        status = ExitStatus.from_returncode(-signal.SIGKILL)
        assert status == ExitStatus(signal=signal.SIGKILL)
        assert status.code is None

    def test_str(self) -> None:
        """An exit reads "exit N", a signal "killed by SIGNAME"."""
        assert str(ExitStatus(code=3)) == "exit 3"
        assert str(ExitStatus.from_returncode(-9)) == "killed by SIGKILL"
        assert str(ExitStatus.from_returncode(-15)) == "killed by SIGTERM"

    def test_unknown_signal_is_named_by_number(self) -> None:
        """A signal number with no name reads "signal N"."""
        status = ExitStatus(signal=200)
        assert status.signal_name == "signal 200"
        assert str(status) == "killed by signal 200"

    def test_failed(self) -> None:
        """Non-zero codes and signals are failures; exit 0 is not."""
        assert not CLEAN.failed
        assert ExitStatus(code=1).failed
        assert ExitStatus(code=EXIT_LEASE_LOST).failed
        assert KILLED.failed
        assert ExitStatus(signal=signal.SIGTERM).failed

    def test_signal_name_of_an_exit_is_none(self) -> None:
        """An exit code has no signal name."""
        assert CRASH.signal_name is None


class TestPolicies:
    @pytest.mark.parametrize("status", [CLEAN, CRASH, KILLED])
    def test_always_restarts_every_exit(self, status: ExitStatus) -> None:
        """Policy always restarts clean exits, failures and kills alike."""
        decision = tracker(policy="always").on_exit(status, now=0.0, ran_for=1.0)
        assert decision == Decision(True, delay=1.0, reason=str(status))

    @pytest.mark.parametrize("status", [CRASH, KILLED])
    def test_on_failure_restarts_failures(self, status: ExitStatus) -> None:
        """Policy on-failure restarts a non-zero exit or a signal."""
        decision = tracker(policy="on-failure").on_exit(status, now=0.0, ran_for=1.0)
        assert decision.restart
        assert not decision.failed

    def test_on_failure_leaves_a_clean_exit(self) -> None:
        """Policy on-failure does not restart exit 0, and the bot is not failed."""
        restarts = tracker(policy="on-failure")
        decision = restarts.on_exit(CLEAN, now=0.0, ran_for=1.0)
        assert decision == Decision(False, reason="exit 0; restart policy is on-failure")
        assert restarts.restarts == 0

    @pytest.mark.parametrize("status", [CLEAN, CRASH, KILLED])
    def test_never_restarts_nothing(self, status: ExitStatus) -> None:
        """Policy never restarts nothing, and does not call the bot failed."""
        decision = tracker(policy="never").on_exit(status, now=0.0, ran_for=1.0)
        assert not decision.restart
        assert not decision.failed
        assert decision.reason == f"{status}; restart policy is never"

    @pytest.mark.parametrize("policy", ["always", "on-failure", "never"])
    def test_config_exit_fails_at_once(self, policy: str) -> None:
        """EXIT_CONFIG (bad spec or entry point) marks the bot failed on its first exit."""
        decision = tracker(policy=policy).on_exit(
            ExitStatus(code=EXIT_CONFIG), now=0.0, ran_for=0.1
        )
        assert not decision.restart
        assert decision.failed
        assert "cannot start" in decision.reason


class TestBackoff:
    def test_delays_double_up_to_the_cap(self) -> None:
        """Each quick crash waits twice as long as the last, up to backoff_cap."""
        restarts = tracker(crash_loop_restarts=100)
        decisions = crash_times(restarts, [float(t) for t in range(0, 700, 100)])
        assert [d.delay for d in decisions] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
        assert all(d.restart for d in decisions)
        assert restarts.restarts == 7

    def test_long_run_resets_the_backoff(self) -> None:
        """A run of at least reset_after seconds starts the delays from backoff_base again."""
        restarts = tracker(crash_loop_restarts=100)
        assert [d.delay for d in crash_times(restarts, [0.0, 100.0, 200.0])] == [1.0, 2.0, 4.0]
        assert restarts.on_exit(CRASH, now=300.0, ran_for=30.0).delay == 1.0
        assert restarts.on_exit(CRASH, now=400.0, ran_for=29.9).delay == 2.0

    def test_default_backoff_jitters_below_the_exponential_delay(self) -> None:
        """Without a backoff given, delays come from the policy with some jitter."""
        restarts = RestartTracker(RestartPolicy(backoff_base=1.0, backoff_cap=30.0))
        delays = [d.delay for d in crash_times(restarts, [0.0, 100.0, 200.0])]
        for delay, exact in zip(delays, [1.0, 2.0, 4.0], strict=True):
            assert 0.8 * exact <= delay <= exact


class TestCrashLoop:
    def test_fails_after_n_restarts_within_the_window(self) -> None:
        """The exit after crash_loop_restarts restarts within the window marks the bot failed."""
        restarts = tracker(crash_loop_restarts=3, crash_loop_window=60.0)
        first = crash_times(restarts, [0.0, 10.0, 20.0])
        assert all(d.restart for d in first)
        decision = restarts.on_exit(KILLED, now=30.0, ran_for=1.0)
        assert not decision.restart
        assert decision.failed
        assert decision.reason.startswith(
            "crash loop: 4 exits within 60s (last: killed by SIGKILL)"
        )
        assert "`multibot restart <bot>`" in decision.reason
        assert restarts.restarts == 3

    def test_stays_failed(self) -> None:
        """A failed tracker keeps refusing further exits until reset."""
        restarts = tracker(crash_loop_restarts=1, crash_loop_window=60.0)
        assert crash_times(restarts, [0.0])[0].restart
        assert [d.failed for d in crash_times(restarts, [1.0, 2.0])] == [True, True]

    def test_exits_spread_wider_than_the_window_never_fail(self) -> None:
        """Exits further apart than the window are each restarted, forever."""
        restarts = tracker(crash_loop_restarts=2, crash_loop_window=60.0)
        decisions = crash_times(restarts, [t * 30.5 for t in range(50)])
        assert all(d.restart and not d.failed for d in decisions)
        assert restarts.restarts == 50

    def test_restart_exactly_one_window_ago_has_left_it(self) -> None:
        """A restart ``crash_loop_window`` seconds before an exit no longer counts."""
        restarts = tracker(crash_loop_restarts=1, crash_loop_window=60.0)
        assert crash_times(restarts, [0.0, 60.0])[1].restart
        assert crash_times(restarts, [119.9])[0].failed

    def test_reset_gives_a_failed_bot_a_new_chance(self) -> None:
        """After reset() (an operator's restart) the bot restarts again, from the base delay."""
        restarts = tracker(crash_loop_restarts=2, crash_loop_window=60.0)
        assert crash_times(restarts, [0.0, 1.0, 2.0])[2].failed
        restarts.reset()
        decision = restarts.on_exit(CRASH, now=3.0, ran_for=1.0)
        assert decision == Decision(True, delay=1.0, reason="exit 1")
        assert crash_times(restarts, [4.0])[0].restart
        assert crash_times(restarts, [5.0])[0].failed
