"""``multibot bench-api`` runs end to end: a real manager, the load from a second process."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from manager.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_reports_events_latency_and_rss() -> None:
    """A 1 s run per batch size: events accepted, no answer but 202, every figure there."""
    done = CliRunner().invoke(
        main, ["bench-api", "--duration", "1", "--concurrency", "2", "--json"]
    )
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rate_limit_raised_to"]["rate_limit"] >= 1_000_000
    assert set(result["batches"]) == {"1", "100"}
    for batch, run in result["batches"].items():
        assert run["batch"] == int(batch)
        assert run["events_accepted"] > 0
        assert run["events_per_s"] > 0
        assert run["requests_per_s"] > 0
        assert run["errors"] == {}
        lat = run["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    rss = result["manager_rss_bytes"]
    assert 10 * 1024 * 1024 < rss["idle"] <= rss["peak"]
