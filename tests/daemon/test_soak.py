"""``multibot soak`` end to end: a real manager under load and faults loses nothing."""

from __future__ import annotations

import json

import pytest

from tests.daemon.test_start import multibot

FAULTS = "bot-kill,redis-kill,pg-diskfull,hung-handler,hostile"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_a_short_soak_with_faults_loses_nothing() -> None:
    """35 s at 1000/s with five fault classes: every confirmed event handled (or dead-lettered)
    by both soak groups and archived, the manager never exited on its own, the run-once
    group's only duplicates are events whose process was killed mid-flight."""
    done = multibot("soak", "--duration", "35", "--faults", FAULTS, "--json", timeout=280)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert report["lost"] == 0, (report["groups"], report["lost_archive_sample"])
    assert report["unexpected_manager_exits"] == 0
    assert report["caught_up"], report["backlog_left"]
    assert done.returncode == 0, done.stderr
    assert report["confirmed"] > 10_000
    assert {f["fault"] for f in report["faults"]} == set(FAULTS.split(","))
    assert report["fault_errors"] == []
    for name, group in report["groups"].items():
        assert group["unexplained_duplicates"] == 0, (name, group["unexplained_sample"])
    once = report["groups"]["bot-group-soak-once"]["duplicates_by_cause"]
    assert set(once) <= {"bot-kill"}, once  # the run-once helper: only a kill mid-handler
    assert report["hung_handler"]["published"] == 2
    assert report["hung_handler"]["bot-group-soak-plain timeout"] == 2
    assert report["hung_handler"]["bot-group-soak-once timeout"] == 2
    malformed = [h for h in report["hostile"] if h["kind"] != "near-limit-id"]
    for entry in malformed:
        assert "bot-group-soak-plain: malformed" in entry["dead_letters"], entry
        assert "bot-group-soak-once: malformed" in entry["dead_letters"], entry
    memory = report["redis_memory"]
    assert memory["maxmemory_bytes"] > 0  # the embedded Redis is bounded
    assert memory["over_maxmemory_samples"] == 0
