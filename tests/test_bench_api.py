"""``multibot bench-api`` runs end to end: a real manager, the load from a second process."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from click.testing import CliRunner

from manager.bench.api_bench import run_api_bench
from manager.cli import main
from manager.errors import ManagerError

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def bench_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory where the bench makes its run's directory (one another OS user can
    reach: as root, embedded PostgreSQL runs as one), removed at teardown."""
    directory = Path(tempfile.mkdtemp(prefix="multibot-bench-test-"))
    directory.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_reports_events_latency_and_rss_beside_the_bus() -> None:
    """A 1 s run per batch size, of the bus and of the API: events accepted, no failure,
    every figure there, and the API's share of the bus's events/s with its targets."""
    done = CliRunner().invoke(
        main, ["bench-api", "--duration", "1", "--concurrency", "2", "--json"]
    )
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rate_limit_raised_to"]["rate_limit"] >= 1_000_000
    assert set(result["batches"]) == set(result["bus"]) == set(result["against_bus"]) == {
        "1", "100"}  # fmt: skip
    for batch in ("1", "100"):
        for run in (result["batches"][batch], result["bus"][batch]):
            assert run["batch"] == int(batch)
            assert run["concurrency"] == 2
            assert run["events_accepted"] > 0
            assert run["events_per_s"] > 0
            assert run["requests_per_s"] > 0
            assert run["errors"] == {}
            lat = run["latency_ms"]
            assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        versus = result["against_bus"][batch]
        api, bus = result["batches"][batch]["events_per_s"], result["bus"][batch]["events_per_s"]
        assert versus["events_share"] == round(api / bus, 3)
        assert versus["events_share_target"] == (0.5 if batch == "1" else 0.7)
        assert versus["api_p99_over_p95"] >= 1
        assert isinstance(versus["met"], bool)
    assert "2 calls in flight" in result["fairness"]
    rss = result["manager_rss_bytes"]
    assert 10 * 1024 * 1024 < rss["idle"] <= rss["peak"]


def test_the_text_report_compares_with_the_bus() -> None:
    """Without --json: a line per batch size against the bus, with the fairness note."""
    done = CliRunner().invoke(
        main, ["bench-api", "--duration", "0.5", "--concurrency", "2", "--batch", "10"]
    )
    assert done.exit_code == 0, done.output
    assert "the API against the bus itself, side by side:" in done.output
    assert "batches of 10: API " in done.output
    assert "(target >= 0.7)" in done.output
    assert "2 calls in flight" in done.output


def test_a_failing_load_process_leaves_nothing_open(bench_tmp: Path) -> None:
    """The load process exits 2: a ManagerError with its stderr; the manager's notify
    socket is closed (no ResourceWarning when collected) and the run's files are gone."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            ManagerError, match=r"(?s)the publishing process failed \(exit 2\).*--concurrency"
        ):
            # 0 calls in flight: the bus's publishing process (run first) exits 2; run on
            # the loop the command uses
            uvloop.run(run_api_bench(0, 1.0, lambda _: None, batches=(1,)))
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert list(bench_tmp.iterdir()) == []
