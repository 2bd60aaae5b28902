"""Tests for manager.bench: options, recording, statistics, and short runs on a real Redis."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import structlog
from click.testing import CliRunner

from bus.archive.store import ArchiveStore
from manager.bench.archive_bench import run_archive_bench
from manager.bench.command import bench
from manager.bench.database import with_database
from manager.bench.options import BenchError, BenchOptions, Roles
from manager.bench.recording import Recorder, Tally
from manager.bench.repeats import summary_json, summary_table
from manager.bench.report import (
    BenchReport,
    LatencyStats,
    PhaseResult,
    count_deliveries,
    percentile,
)
from manager.bench.runner import _drain, run_bench
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import free_port
from tests.support import redis_client

#: Keys the issue promises scripts in the --json line.
PROMISED_KEYS = {
    "offered_per_s", "events_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "lost",
    "duplicated", "baseline_events_per_s", "baseline_p95_ms", "rss_mb",
}  # fmt: skip
SHORT_RUN = BenchOptions(producers=2, consumers=2, rate=200, duration=1.0, warmup=0.2)


def progress_slots(n: int = 1) -> memoryview:
    return memoryview(bytearray(8 * n)).cast("q")


class TestPercentile:
    def test_nearest_rank(self) -> None:
        """Percentiles are nearest-rank: always a measured value, p100 the maximum."""
        values = [float(v) for v in range(1, 101)]
        assert percentile(values, 50) == 50.0
        assert percentile(values, 95) == 95.0
        assert percentile(values, 99) == 99.0
        assert percentile(values, 100) == 100.0
        assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
        assert percentile([7.0], 0) == 7.0

    def test_empty_is_nan(self) -> None:
        """No values give NaN rather than a made-up zero."""
        assert math.isnan(percentile([], 50))

    def test_latency_stats_sort_and_convert_to_ms(self) -> None:
        """LatencyStats sorts latencies given in seconds and reports milliseconds."""
        stats = LatencyStats.of([0.003, 0.001, 0.002, 0.010])
        assert (stats.p50_ms, stats.p95_ms, stats.max_ms) == pytest.approx((2.0, 10.0, 10.0))


class TestCountDeliveries:
    def test_exactly_once_is_clean(self) -> None:
        """Every confirmed event seen once: nothing lost, nothing duplicated."""
        tally = Tally(attempted={0: 3, 1: 2})
        seen = [{0: bytes([1, 1, 1, 0]), 1: bytes([1, 1])}]
        assert count_deliveries([tally], seen) == (0, 0)

    def test_unseen_and_twice_seen_across_processes(self) -> None:
        """A seq never seen is lost; seen in two consumer processes is a duplicate."""
        tally = Tally(attempted={0: 4})
        seen = [{0: bytes([1, 0, 1])}, {0: bytes([0, 0, 1])}]  # seq 1, 3 unseen; 2 twice
        assert count_deliveries([tally], seen) == (2, 1)

    def test_failed_publishes_are_not_lost(self) -> None:
        """An event whose publish raised was never confirmed, so missing it is no loss."""
        tally = Tally(attempted={0: 3}, failed=[(0, 1)])
        assert count_deliveries([tally], [{0: bytes([1, 0, 1])}]) == (0, 0)


class TestRecorder:
    def test_dedupes_and_counts_progress(self) -> None:
        """A second delivery counts as handled but not as progress, and adds no latency."""
        progress = progress_slots(2)
        recorder = Recorder(progress, 1)
        recorder.measure_from = 100.0
        recorder.record(0, 5000, sent=100.0, handled=100.002)
        recorder.record(0, 5000, sent=100.0, handled=100.009)
        assert (recorder.unique, recorder.handled, progress[1]) == (1, 2, 1)
        assert list(recorder.latencies) == pytest.approx([0.002])
        assert recorder.seen[0][5000] == 2

    def test_warmup_events_have_no_latency(self) -> None:
        """Events published before the measured window count for losses only."""
        recorder = Recorder(progress_slots(), 0)
        recorder.measure_from = 100.0
        recorder.record(3, 0, sent=99.5, handled=99.6)
        assert recorder.unique == 1
        assert len(recorder.latencies) == 0


class TestOptions:
    def test_batch_defaults(self) -> None:
        """Rated runs send one event at a time; flat out sends and reads 50."""
        assert BenchOptions().batch_size == 1
        assert BenchOptions(rate=0).batch_size == 50
        assert BenchOptions(rate=0, batch=1).batch_size == 1

    def test_read_count_is_the_bus_default_unless_given(self) -> None:
        """Consumers read 200 entries at most (the bus default), or --read-count when given."""
        assert BenchOptions(rate=0).read_size == 200
        assert BenchOptions(rate=0).batch_size == 50
        assert BenchOptions(read_count=7).read_size == 7
        assert BenchOptions(read_count=7).batch_size == 1

    def test_send_interval_spreads_the_rate(self) -> None:
        """Each of 10 producers sends every 10 ms for 1000 events/s in total."""
        assert BenchOptions(producers=10, rate=1000).send_interval == pytest.approx(0.01)
        assert BenchOptions(rate=0).send_interval == 0.0

    def test_default_layout_is_one_producer_and_one_consumer_process(self) -> None:
        """Two processes: every producer in one, every consumer in the other."""
        assert BenchOptions(producers=3, consumers=2).layout() == (
            Roles(producers=(0, 1, 2)),
            Roles(consumers=(0, 1)),
        )

    def test_layout_spreads_and_caps(self) -> None:
        """More processes deal roles round-robin; one process runs all; no empty process."""
        wide = BenchOptions(producers=3, consumers=1, processes=6).layout()
        assert wide == (Roles(producers=(0,)), Roles(producers=(1,)), Roles(producers=(2,)),
                        Roles(consumers=(0,)))  # fmt: skip
        assert BenchOptions(producers=2, consumers=2, processes=1).layout() == (
            Roles(producers=(0, 1), consumers=(0, 1)),
        )

    def test_rejects_nonsense(self) -> None:
        """Bad parameters are refused with the option's name."""
        with pytest.raises(BenchError, match="--producers"):
            BenchOptions(producers=0)
        with pytest.raises(BenchError, match="--duration"):
            BenchOptions(duration=0)

    def test_deliveries_run_as_bots(self) -> None:
        """Delivery records need the bots' outbox, so --deliveries refuses --as-admin; a
        PostgreSQL DSN without --deliveries would be unused, so it is refused too."""
        with pytest.raises(BenchError, match="--as-admin"):
            BenchOptions(deliveries=True, bot_user=False)
        with pytest.raises(BenchError, match="--postgres-dsn needs --deliveries"):
            BenchOptions(postgres_dsn="postgresql://x@127.0.0.1/db")


class TestDatabase:
    def test_with_database_keeps_everything_but_the_database(self) -> None:
        """The run's database replaces the DSN's, in the path and in the query alike."""
        assert (
            with_database("postgresql://u:p%40w@h:5433/prod?sslmode=disable&dbname=x", "b1")
            == "postgresql://u:p%40w@h:5433/b1?sslmode=disable"
        )


class TestDrain:
    async def test_done_at_once_when_everything_was_seen(self) -> None:
        """With every event seen the drain returns at once."""
        progress = progress_slots(2)
        progress[0], progress[1] = 3, 4
        done, seconds = await _drain(progress, 7, stall=5.0)
        assert done
        assert seconds < 1.0

    async def test_gives_up_when_consumers_stall(self) -> None:
        """No progress for the stall time ends the drain: the rest counts as lost."""
        progress = progress_slots()
        progress[0] = 1
        done, seconds = await _drain(progress, 2, stall=0.05)
        assert not done
        assert 0.05 <= seconds < 1.0


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.one_redis  # what the report holds does not differ between Redis versions
class TestRunBench:
    async def test_short_run_reports_everything(self, redis_url: str) -> None:
        """A short 2x2 run at 200 events/s handles every event once, on the bus and raw."""
        report = await run_bench(
            BenchOptions(
                redis_url=redis_url, producers=2, consumers=2, rate=200, duration=1.0, warmup=0.2
            )
        )
        out = report.to_json()
        assert set(out) >= PROMISED_KEYS | {"idle_client_rss_mb", "bus_vs_baseline"}
        assert (out["lost"], out["duplicated"]) == (0, 0)
        assert (out["baseline_lost"], out["baseline_duplicated"]) == (0, 0)
        assert out["events_per_s"] > 0
        assert out["baseline_events_per_s"] > 0
        assert 150 <= out["events"] <= 250
        assert 0 < out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"] <= out["max_ms"]
        assert 0 < out["publish_p50_ms"] <= out["publish_p95_ms"] <= out["publish_p99_ms"]
        assert 10 < out["rss_mb"] < 500
        assert "bus" in report.table()
        async with redis_client(redis_url) as redis:
            assert [k async for k in redis.scan_iter(match="bench-*")] == []

    async def test_relayed_baseline_moves_every_event_through_an_outbox(
        self, redis_url: str
    ) -> None:
        """--relay-baseline: the baseline runs again with its producers writing to an outbox
        that a bare relay moves to the stream; every event arrives once (none is left in
        the outbox), and the table and the repeat summary set it beside the bus."""
        options = BenchOptions(
            redis_url=redis_url, producers=2, consumers=2, rate=200, duration=1.0,
            warmup=0.2, relay_baseline=True,
        )  # fmt: skip
        report = await run_bench(options)
        out = report.to_json()
        assert (out["relayed_baseline_lost"], out["relayed_baseline_duplicated"]) == (0, 0)
        assert 150 <= out["relayed_baseline_events"] <= 250
        assert 0 < out["relayed_baseline_p50_ms"] <= out["relayed_baseline_p95_ms"]
        assert "+relay" in report.table().splitlines()[2]
        assert "baseline+relay #1 (2 consumers)" in report.table()
        summary = summary_table([report, report])
        assert "p95 bus/relay" in summary.splitlines()[0]
        assert "p95 bus/relayed baseline: worst run" in summary
        assert summary_json([report])["median"]["relayed_baseline_p95_ms"] == round(
            out["relayed_baseline_p95_ms"], 3
        )
        async with redis_client(redis_url) as redis:
            assert [k async for k in redis.scan_iter(match="bench-*")] == []

    def test_relayed_baseline_needs_the_baseline(self) -> None:
        with pytest.raises(BenchError, match="--relay-baseline needs the baseline"):
            BenchOptions(baseline=False, relay_baseline=True)

    async def test_partitions_split_the_route_and_lose_nothing(self, redis_url: str) -> None:
        """--partitions 4: the bus phase publishes keyed events to 4 partition streams,
        which 2 consumer replicas share, and every event is handled once."""
        options = BenchOptions(
            redis_url=redis_url, producers=2, consumers=2, rate=200, duration=1.0,
            warmup=0.2, partitions=4, baseline=False,
        )  # fmt: skip
        out = (await run_bench(options)).to_json()
        assert (out["lost"], out["duplicated"], out["partitions"]) == (0, 0, 4)
        assert 150 <= out["events"] <= 250


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.one_redis
class TestDeliveries:
    async def test_records_phase_copies_a_record_per_delivery(
        self, redis_url: str, postgres_server: PostgresServer
    ) -> None:
        """--deliveries runs the bus phase off and on; with records on, every handled
        delivery has its record copied into PostgreSQL, and nothing is lost."""
        options = BenchOptions(
            redis_url=redis_url, producers=1, consumers=1, rate=200, duration=1.0,
            warmup=0.2, baseline=False, deliveries=True, postgres_dsn=postgres_server.dsn,
        )  # fmt: skip
        report = await run_bench(options)
        out = report.to_json()
        assert (out["lost"], out["records_lost"]) == (0, 0)
        assert out["events_per_s"] > 0
        assert out["records_events_per_s"] > 0
        assert out["records_vs_bus_events_per_s"] > 0
        assert out["records_copied"] == out["records_handled"] >= out["records_events"]
        assert out["records_dropped"] == 0
        assert out["records_copy_lag_s"] is not None
        assert (out["records_left_in_stream"], out["records_left_in_outbox"]) == (0, 0)
        assert out["records_bytes_per_delivery"] > 0
        table = report.table()
        assert "bus+records" in table
        assert "on/off" in table
        async with redis_client(redis_url) as redis:
            assert [k async for k in redis.scan_iter(match="bench-*")] == []
        async with (
            await ArchiveStore.connect(postgres_server.dsn) as store,
            store.connection() as conn,
        ):
            left = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'multibot_bench_%'"
            )
        assert left == []  # the run's database is dropped


class TestUnreachable:
    async def test_unreachable_redis_is_a_clear_error(self) -> None:
        """A URL where nothing listens fails with advice, before any process starts."""
        url = f"redis://127.0.0.1:{free_port()}/0"
        with pytest.raises(BenchError, match=r"cannot reach Redis at redis://127\.0\.0\.1"):
            await run_bench(BenchOptions(redis_url=url))


@pytest.fixture
def fresh_structlog() -> Iterator[None]:
    """Unconfigured structlog, as in a fresh ``multibot`` process (other tests may have
    configured it); the command then configures it, which is undone afterwards."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def fake_report(lost: int) -> BenchReport:
    phase = PhaseResult(
        published_per_s=10.0,
        events_per_s=10.0,
        latency=LatencyStats(1.0, 2.0, 3.0, 4.0),
        publish=LatencyStats(0.5, 1.0, 1.5, 2.0),
        events=10,
        lost=lost,
        duplicated=0,
        rss_mb={"bus #0 (1 producer)": 40.0},
    )
    return BenchReport(BenchOptions(), phase, None, 40.0, "7.0.15")


def timed_report(p95: float, base_p95: float, lost: int = 0) -> BenchReport:
    """A report whose bus and baseline p95 are as given (ms)."""

    def phase(p: float, lost: int) -> PhaseResult:
        return PhaseResult(
            published_per_s=1000.0, events_per_s=1000.0,
            latency=LatencyStats(p / 2, p, p * 2, p * 3), publish=LatencyStats(0.1, 0.2, 0.3, 0.4),
            events=10_000, lost=lost, duplicated=0, rss_mb={"bus #0 (1 producer)": 40.0},
        )  # fmt: skip

    return BenchReport(BenchOptions(), phase(p95, lost), phase(base_p95, 0), 40.0, "7.0.15")


class TestRepeat:
    def test_each_run_and_the_medians(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--repeat 3: the last run's full table, then a line per run with the bus's and
        the baseline's p95 and their ratio, a median line and the worst ratio; --json has
        every run and the medians."""
        runs = iter([timed_report(3.0, 2.0), timed_report(8.0, 2.0), timed_report(4.0, 2.0)] * 2)

        async def next_run(options: BenchOptions) -> BenchReport:
            return next(runs)

        monkeypatch.setattr("manager.bench.command.run_bench", next_run)
        result = CliRunner().invoke(bench, ["--repeat", "3", "--redis-url", "redis://x:1/0"])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert "latency p95 ms" in result.stdout
        per_run = [line.split() for line in lines if line[:1] in ("1", "2", "3")]
        assert [row[4] for row in per_run] == ["1.50", "4.00", "2.00"]
        assert next(line for line in lines if line.startswith("med")).split()[4] == "2.00"
        assert "worst run 4.00, median 2.00" in result.stdout
        result = CliRunner().invoke(
            bench, ["--repeat", "3", "--json", "--redis-url", "redis://x:1/0"]
        )
        answer = json.loads(result.stdout)
        assert len(answer["runs"]) == 3 and answer["median"]["bus_p95_ms"] == 4.0
        assert answer["worst_p95_bus_vs_baseline"] == 4.0

    def test_a_loss_in_any_run_exits_1(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Events lost in the first of two runs: exit 1, saying so."""
        runs = iter([timed_report(3.0, 2.0, lost=2), timed_report(3.0, 2.0)])

        async def next_run(options: BenchOptions) -> BenchReport:
            return next(runs)

        monkeypatch.setattr("manager.bench.command.run_bench", next_run)
        result = CliRunner().invoke(bench, ["--repeat", "2", "--redis-url", "redis://x:1/0"])
        assert result.exit_code == 1
        assert "lost in an earlier run" in result.stderr


class TestCommand:
    def test_exits_1_when_events_were_lost(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Lost events make the command exit 1 with a message, after the report."""

        async def lossy(options: BenchOptions) -> BenchReport:
            return fake_report(lost=3)

        monkeypatch.setattr("manager.bench.command.run_bench", lossy)
        result = CliRunner().invoke(bench, ["--json", "--redis-url", "redis://x:1/0"])
        assert result.exit_code == 1
        assert json.loads(result.stdout)["lost"] == 3
        assert "events were lost (bus 3)" in result.stderr

    def test_table_without_baseline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The human table prints both columns, with dashes for a skipped baseline."""

        async def clean(options: BenchOptions) -> BenchReport:
            return fake_report(lost=0)

        monkeypatch.setattr("manager.bench.command.run_bench", clean)
        result = CliRunner().invoke(bench, ["--no-baseline", "--redis-url", "redis://x:1/0"])
        assert result.exit_code == 0, result.output
        assert "latency p95 ms" in result.stdout
        assert "idle bus client" in result.stdout
        p95_row = next(line for line in result.stdout.splitlines() if "p95" in line)
        assert p95_row.split()[-2:] == ["2.000", "-"]

    def test_postgres_dsn_needs_deliveries(self) -> None:
        """--postgres-dsn alone is a usage error (exit 2), before anything starts."""
        result = CliRunner().invoke(bench, ["--postgres-dsn", "postgresql://x@127.0.0.1/db"])
        assert result.exit_code == 2
        assert "--postgres-dsn needs --deliveries" in result.output

    def test_rejects_bad_counts(self) -> None:
        """--producers 0 is a usage error (exit 2), before anything starts."""
        result = CliRunner().invoke(bench, ["--producers", "0"])
        assert result.exit_code == 2
        assert "--producers" in result.output

    @pytest.mark.slow
    @pytest.mark.usefixtures("fresh_structlog")
    def test_json_line_on_private_redis(self) -> None:
        """Without a URL it runs its own redis-server and prints exactly one JSON line."""
        args = ["--producers", "2", "--consumers", "2", "--rate", "200", "--duration", "1",
                "--warmup", "0.2", "--no-baseline", "--json"]  # fmt: skip
        result = CliRunner(env={"MULTIBOT_REDIS_URL": None}).invoke(bench, args)
        assert result.exit_code == 0, result.output
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1
        out = json.loads(lines[0])
        assert set(out) >= PROMISED_KEYS
        assert (out["lost"], out["duplicated"]) == (0, 0)
        assert out["baseline_events_per_s"] is None


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.one_redis
class TestArchiveBench:
    async def test_short_run_reports_throughput_delay_disk_and_replay(self) -> None:
        """bench-archive on its own private servers: every figure the README quotes is
        there, the disk per event of the steady-rate events included, and replay from
        PostgreSQL gives back every event once Redis is trimmed."""
        out = await run_archive_bench(2000, rate=500, duration=2.0, echo=lambda _: None)
        assert out["archiver"]["events_per_s"] > 0
        lag = out["archive_delay_at_rate"]
        assert lag["events"] == 1000
        assert 0 < lag["p50_ms"] <= lag["p95_ms"] <= lag["p99_ms"] <= lag["max_ms"]
        assert 0 < out["disk_bytes_per_event_at_rate"] < 2000
        assert 0 < out["disk_bytes_per_million"] < 2000 * 1_000_000
        assert out["replay_from_postgres"]["events"] == 3000
