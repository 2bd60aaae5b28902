"""``multibot bench-manager`` runs end to end and reports every number."""

from __future__ import annotations

import json

import pytest

from tests.daemon.test_start import multibot

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_reports_start_memory_restart_and_failover() -> None:
    """One round: every figure is there and plausible (not a speed assertion)."""
    done = multibot("bench-manager", "--rounds", "1", "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ready_first_start_s"] > 0
    assert result["ready_second_start_s"] > 0
    assert result["manager_rss_bytes"] > 10 * 1024 * 1024
    assert result["bots"] == 5
    assert result["restart_s"]["min"] <= result["restart_s"]["max"]
    assert result["failover_s"]["median"] > 0
