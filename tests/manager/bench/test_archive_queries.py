"""Tests for manager.bench.archive_queries: the query comparison of ``bench-archive``, run
small against real PostgreSQL servers, and how it reports what differs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import pytest
from click.testing import CliRunner

from bus.event import Event
from manager.bench.archive_command import bench_archive
from manager.bench.archive_queries import (
    QUERIES,
    Args,
    Timings,
    compare_layouts,
    comparison_lines,
)
from manager.embedded.postgres_server import PostgresServer

NAMES = {"get", "trace", "type_hour", "rare_type_day", "pattern_hour", "source_hour",
         "second_page", "where_hour", "replay"}  # fmt: skip
FIGURES = ("before_p50_ms", "before_p95_ms", "after_p50_ms", "after_p95_ms")


def event(n: int, data: dict[str, Any] | None = None) -> Event:
    return Event(
        type="orders.order.created", data={"n": n} if data is None else data,
        source="checkout-bot", id=f"id-{n}", timestamp=datetime(2026, 1, 5, tzinfo=UTC),
    )  # fmt: skip


@pytest.mark.postgres
@pytest.mark.slow
class TestCompareLayouts:
    async def test_both_layouts_answer_every_query_alike(
        self, postgres_server: PostgresServer
    ) -> None:
        """3,000 events, 3 runs: every query returns the same events on the old layout and
        on the compact one, each figure is there, both layouts take bytes, and the run's
        databases are dropped."""
        lines: list[str] = []
        result = await compare_layouts(postgres_server.dsn, 3000, 3, lines.append)
        assert result["events"] == 3000
        assert result["bytes_per_event"]["before"] > 0
        assert result["bytes_per_event"]["after"] > 0
        assert set(result["queries"]) == NAMES
        for name, r in result["queries"].items():
            assert r["same"] is True, f"{name}: {r['first_mismatch']}"
            assert r["same_fields"] is True, f"{name}: {r['first_mismatch']}"
            assert r["runs"] == 3
            assert 0 < r["before_p50_ms"] <= r["before_p95_ms"]
            assert 0 < r["after_p50_ms"] <= r["after_p95_ms"]
            assert r["ratio"] == pytest.approx(r["after_p50_ms"] / r["before_p50_ms"], abs=0.01)
        assert any("3,000 of 3,000 events loaded" in line for line in lines)
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            left = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'multibot_bench_%'"
            )
        finally:
            await conn.close()
        assert left == []

    def test_only_queries_from_the_command_line(self) -> None:
        """--only-queries --json runs the comparison alone on a private PostgreSQL: the
        JSON line holds the queries section and nothing of the other phases."""
        done = CliRunner().invoke(
            bench_archive,
            ["--only-queries", "--query-events", "2000", "--query-runs", "2", "--json"],
        )
        assert done.exit_code == 0, done.output
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert set(result) == {"queries"}
        assert set(result["queries"]["queries"]) == NAMES
        assert all(r["same"] for r in result["queries"]["queries"].values())


class TestOptions:
    def test_only_queries_needs_query_events(self) -> None:
        """--only-queries alone is a usage error (exit 2), before anything starts."""
        done = CliRunner().invoke(bench_archive, ["--only-queries"])
        assert done.exit_code == 2
        assert "--only-queries needs --query-events" in done.output

    def test_too_few_query_events(self) -> None:
        """A day of fewer than 1000 events is refused."""
        done = CliRunner().invoke(bench_archive, ["--query-events", "10"])
        assert done.exit_code == 2
        assert "at least 1000" in done.output


class TestTimings:
    def test_the_same_events_are_same(self) -> None:
        """Equal answers: same and same_fields, the medians' ratio after/before."""
        timings = Timings()
        for before, after in ((0.001, 0.002), (0.002, 0.003), (0.003, 0.005)):
            timings.add((before, after), [event(1), event(2)], [event(1), event(2)], Args())
        out = timings.to_json()
        assert (out["same"], out["same_fields"], out["first_mismatch"]) == (True, True, None)
        assert [out[f] for f in FIGURES] == [2.0, 3.0, 3.0, 5.0]
        assert out["ratio"] == 1.5

    def test_other_ids_are_a_mismatch_with_the_first_difference(self) -> None:
        """Missing or reordered events make ``same`` false, and the report names the
        first position that differs and the run's arguments."""
        timings = Timings()
        timings.add((0.001, 0.001), [event(1), event(2)], [event(2), event(1)], Args())
        timings.add((0.001, 0.001), [event(1), event(2)], [event(1)], Args(source="mailer"))
        out = timings.to_json()
        assert (out["same"], out["mismatched_runs"]) == (False, 2)
        assert out["first_mismatch"] == (
            "ids differ: 2 events before, 2 after; first at #0: id-1 before, id-2 after (run with )"
        )

    def test_a_differing_field_is_reported(self) -> None:
        """The same ids with other data: ``same`` holds, ``same_fields`` does not, and
        the field is named."""
        timings = Timings()
        timings.add((0.001, 0.001), [event(1)], [event(1, {"n": 9})], Args(event_id="x"))
        out = timings.to_json()
        assert (out["same"], out["same_fields"], out["differing_runs"]) == (True, False, 1)
        assert "event id-1 differs in data {'n': 1} / {'n': 9}" in out["first_mismatch"]
        assert "(run with event_id=x)" in out["first_mismatch"]

    def test_table_flags_differences(self) -> None:
        """The text table has a row per query and lists the differences under it."""
        good, bad = Timings(), Timings()
        good.add((0.001, 0.001), [event(1)], [event(1)], Args())
        bad.add((0.001, 0.001), [event(1)], [], Args())
        section = {
            "events": 1000,
            "bytes_per_event": {"before": 300.5, "after": 150.25},
            "load_seconds": {"before": 1.0, "after": 2.0},
            "queries": {"get": good.to_json(), "trace": bad.to_json()},
        }
        text = "\n".join(comparison_lines(section))
        assert "bytes per event: before 300.5, after 150.25" in text
        assert "get by id" in text
        assert "NO (1 of 1 runs)" in text
        assert "trace: ids differ: 1 events before, 0 after" in text
        assert len(QUERIES) == len(NAMES)
