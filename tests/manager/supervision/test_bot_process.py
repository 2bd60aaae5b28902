"""Tests for manager.supervision.bot_process's HangCheck: which timeout makes a process
hung; no clocks."""

from __future__ import annotations

from manager.supervision.bot_process import HangCheck

CHECK = HangCheck(heartbeat_timeout=10.0, startup_timeout=30.0)
SPAWN = 1000.0


class TestHangCheck:
    def test_no_first_beat_within_startup_timeout_is_not_hung(self) -> None:
        """Before its first beat, a process silent far past the heartbeat timeout is fine."""
        assert CHECK.reason(SPAWN + 29.9, started_at=SPAWN, last_heartbeat=None) is None

    def test_no_first_beat_past_startup_timeout_is_hung(self) -> None:
        """Before its first beat, past the start-up timeout: hung, and the reason says so."""
        reason = CHECK.reason(SPAWN + 30.1, started_at=SPAWN, last_heartbeat=None)
        assert reason == "no first heartbeat within 30s of start"

    def test_exactly_at_a_timeout_is_not_hung(self) -> None:
        """A timeout is hung only once passed, not when reached."""
        assert CHECK.reason(SPAWN + 30.0, started_at=SPAWN, last_heartbeat=None) is None
        assert CHECK.reason(SPAWN + 50.0, started_at=SPAWN, last_heartbeat=SPAWN + 40.0) is None

    def test_after_first_beat_heartbeat_timeout_applies(self) -> None:
        """Once it beat, silence past the heartbeat timeout is hung, well within start-up."""
        beat = SPAWN + 1.0
        assert CHECK.reason(beat + 9.9, started_at=SPAWN, last_heartbeat=beat) is None
        reason = CHECK.reason(beat + 12.34, started_at=SPAWN, last_heartbeat=beat)
        assert reason == "no heartbeat for 12.3s (timeout 10s)"

    def test_slow_first_beat_then_regular_beats_is_not_hung(self) -> None:
        """A first beat at 25 s (a slow import) then regular beats: never hung."""
        beats = [SPAWN + 25.0 + i for i in range(20)]
        for beat in beats:
            assert CHECK.reason(beat + 0.9, started_at=SPAWN, last_heartbeat=beat) is None

    def test_startup_timeout_shorter_than_heartbeat_timeout(self) -> None:
        """Each timeout applies to its own phase, whichever is longer."""
        check = HangCheck(heartbeat_timeout=10.0, startup_timeout=3.0)
        reason = check.reason(SPAWN + 3.5, started_at=SPAWN, last_heartbeat=None)
        assert reason == "no first heartbeat within 3s of start"
        assert check.reason(SPAWN + 9.0, started_at=SPAWN, last_heartbeat=SPAWN + 1.0) is None
