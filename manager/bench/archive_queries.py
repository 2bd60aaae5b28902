"""``bench-archive --query-events N``: every read the CLI and the API offer, timed on the
old layout and on the compact one over the same synthetic day (:mod:`archive_dataset`).

Each query runs ``runs`` times after a warm-up, with arguments drawn from the day (an
event id, a chain root, an hour …), before and after in turn (A, B, A, B …) so that noise
on the machine falls on both alike. A run is timed end to end from Python: the SQL, the
rows, and the :class:`~bus.event.Event` objects made of them. The two must return the same
events in the same order; where they do not, the report says so with the first difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints

from bus.archive.store import ArchiveStore
from bus.event import Event
from manager.bench.archive_dataset import WORD_VALUES, Sample, SyntheticDay, TypeSpec
from manager.bench.archive_layouts import (
    OldLayout,
    Reads,
    database,
    load_new_layout,
    load_old_layout,
    old_layout_bytes,
    private_server,
    vacuum,
)
from manager.bench.report import percentile

#: Events per page of a query (the API's default), and the replay's pages.
PAGE = 100
REPLAY_PAGE, REPLAY_PAGES = 1000, 10
#: Untimed runs of each query before the timed ones.
WARMUP = 3
#: A wildcard pattern of the day's types (the ``orders`` stream's three).
PATTERN = "orders.#"

#: A timed call: the query, from the request to the events.
Run = Callable[[], Awaitable[list[Event]]]


@dataclass(frozen=True, slots=True)
class Args:
    """The arguments of one run of a query; each query reads those it needs."""

    event_id: str = ""
    types: tuple[str, ...] = ()
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    where: Mapping[str, Any] | None = None
    stream: str = ""
    after: str | None = None


@dataclass(frozen=True, slots=True)
class Picks:
    """Where the runs' arguments come from: the day's vocabulary and a sample of its
    events, drawn from with ``rng``."""

    day: SyntheticDay
    sample: Sample
    rng: random.Random

    def hour(self) -> tuple[datetime, datetime]:
        """A random hour of the day, as (since, until)."""
        return self.day.hour(self.rng.randrange(24))

    def common(self) -> TypeSpec:
        """One of the three most common types."""
        return self.rng.choice(self.day.common[:3])


@dataclass(frozen=True, slots=True)
class Query:
    """One read to compare: how its runs' arguments are drawn, and how it runs on a side
    (``prepare`` does the untimed part, like fetching the first page, and returns the
    timed call)."""

    name: str
    title: str
    pick: Callable[[Picks], Args]
    prepare: Callable[[Reads, Args], Awaitable[Run]]


async def _get(reads: Reads, args: Args) -> Run:
    async def run() -> list[Event]:
        event = await reads.get(args.event_id)
        return [] if event is None else [event]

    return run


async def _trace(reads: Reads, args: Args) -> Run:
    async def run() -> list[Event]:
        return await reads.trace(args.event_id)

    return run


async def _page(reads: Reads, args: Args) -> Run:
    async def run() -> list[Event]:
        events, _ = await reads.query(
            types=args.types, source=args.source, since=args.since, until=args.until,
            where=args.where, limit=PAGE,
        )  # fmt: skip
        return events

    return run


async def _second_page(reads: Reads, args: Args) -> Run:
    since, until = args.since, args.until
    _, cursor = await reads.query(types=args.types, since=since, until=until, limit=PAGE)

    async def run() -> list[Event]:
        if cursor is None:  # a day too small for two pages
            return []
        events, _ = await reads.query(
            types=args.types, since=since, until=until, after=cursor, limit=PAGE
        )
        return events

    return run


async def _replay(reads: Reads, args: Args) -> Run:
    async def run() -> list[Event]:
        events: list[Event] = []
        after = args.after
        for _ in range(REPLAY_PAGES):
            page = await reads.entries(args.stream, after=after, limit=REPLAY_PAGE)
            events += page
            if len(page) < REPLAY_PAGE:
                break
            after = page[-1].entry_id
        return events

    return run


def _common_hour(picks: Picks) -> Args:
    since, until = picks.hour()
    return Args(types=(picks.common().name,), since=since, until=until)


def _where_hour(picks: Picks) -> Args:
    spec = picks.common()
    since, until = picks.hour()
    word = spec.words[0]
    where = {word: picks.rng.choice(WORD_VALUES[word])}
    return Args(types=(spec.name,), since=since, until=until, where=where)


def _replay_from(picks: Picks) -> Args:
    stream, entry_id = picks.rng.choice(picks.sample.positions)
    return Args(stream=stream, after=entry_id)


#: The reads the CLI and the API offer, in the order of the report.
QUERIES = (
    Query("get", "get by id",
          lambda p: Args(event_id=p.rng.choice(p.sample.ids)), _get),
    Query("trace", "trace a correlation id",
          lambda p: Args(event_id=p.rng.choice(list(p.sample.roots))), _trace),
    Query("type_hour", "common type, 1 h, page of 100", _common_hour, _page),
    Query("rare_type_day", "rare type, the day, page of 100",
          lambda p: Args(types=(p.day.rare.name,), since=p.day.start, until=p.day.end),
          _page),
    Query("pattern_hour", f"{PATTERN}, 1 h, page of 100",
          lambda p: Args(types=(PATTERN,), since=(h := p.hour())[0], until=h[1]),
          _page),
    Query("source_hour", "source, 1 h, page of 100",
          lambda p: Args(source=p.rng.choice(p.day.sources), since=(h := p.hour())[0],
                              until=h[1]),
          _page),
    Query("second_page", "common type, the day, 2nd page",
          lambda p: Args(types=(p.common().name,), since=p.day.start, until=p.day.end),
          _second_page),
    Query("where_hour", "where on data, common type, 1 h", _where_hour, _page),
    Query("replay", f"replay {REPLAY_PAGES} x {REPLAY_PAGE} of a stream", _replay_from, _replay),
)  # fmt: skip


@dataclass
class Timings:
    """The timed runs of one query on both sides, and how their answers compare."""

    before: list[float] = field(default_factory=list)  # seconds
    after: list[float] = field(default_factory=list)
    #: Runs whose events differ in ids or order.
    mismatched: int = 0
    #: Runs with the same ids in the same order but some other field differing.
    differing: int = 0
    first_mismatch: str | None = None

    def add(
        self, seconds: tuple[float, float], old: list[Event], new: list[Event], args: Args
    ) -> None:
        """Note one run: its seconds before and after, and the events each returned."""
        self.before.append(seconds[0])
        self.after.append(seconds[1])
        difference = _difference(old, new)
        if difference is None:
            return
        other_ids, what = difference
        if other_ids:
            self.mismatched += 1
        else:
            self.differing += 1
        if self.first_mismatch is None:
            self.first_mismatch = f"{what} (run with {_shown(args)})"

    def to_json(self) -> dict[str, Any]:
        """The figures in milliseconds, the ratio of the medians (after/before), whether
        both returned the same events (ids in order), and every field alike."""
        before, after = sorted(self.before), sorted(self.after)
        p50_before, p50_after = percentile(before, 50), percentile(after, 50)
        return {
            "before_p50_ms": round(p50_before * 1000, 3),
            "before_p95_ms": round(percentile(before, 95) * 1000, 3),
            "after_p50_ms": round(p50_after * 1000, 3),
            "after_p95_ms": round(percentile(after, 95) * 1000, 3),
            "ratio": round(p50_after / p50_before, 2) if p50_before else None,
            "same": self.mismatched == 0,
            "same_fields": self.mismatched == 0 and self.differing == 0,
            "runs": len(self.before),
            "mismatched_runs": self.mismatched,
            "differing_runs": self.differing,
            "first_mismatch": self.first_mismatch,
        }


def _difference(old: list[Event], new: list[Event]) -> tuple[bool, str] | None:
    """What differs between the events before and after, and whether it is the ids (or
    their order) or only other fields; None when nothing does."""
    old_ids, new_ids = [e.id for e in old], [e.id for e in new]
    if old_ids != new_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(old_ids, new_ids, strict=False)) if a != b), None
        )
        at = min(len(old_ids), len(new_ids)) if at is None else at
        first = f"#{at}: {_nth(old_ids, at)} before, {_nth(new_ids, at)} after"
        return True, f"ids differ: {len(old)} events before, {len(new)} after; first at {first}"
    for a, b in zip(old, new, strict=True):
        if a != b:
            fields = [
                f.name
                for f in dataclasses.fields(Event)
                if getattr(a, f.name) != getattr(b, f.name)
            ]
            shown = ", ".join(f"{n} {getattr(a, n)!r} / {getattr(b, n)!r}" for n in fields)
            return False, f"event {a.id} differs in {shown}"
    return None


def _nth(ids: list[str], n: int) -> str:
    return ids[n] if n < len(ids) else "none"


def _shown(args: Args) -> str:
    default = Args()
    return ", ".join(
        f"{f.name}={getattr(args, f.name)!s}"
        for f in dataclasses.fields(Args)
        if getattr(args, f.name) != getattr(default, f.name)
    )


async def measure(query: Query, old: Reads, new: Reads, picks: Picks, runs: int) -> Timings:
    """Run ``query`` on both sides, :data:`WARMUP` times untimed, then ``runs`` times timed."""
    timings = Timings()
    for n in range(WARMUP + runs):
        args = query.pick(picks)
        run_old, run_new = await query.prepare(old, args), await query.prepare(new, args)
        started = time.perf_counter()
        old_events = await run_old()
        middle = time.perf_counter()
        new_events = await run_new()
        ended = time.perf_counter()
        if n >= WARMUP:
            timings.add((middle - started, ended - middle), old_events, new_events, args)
    return timings


async def compare_layouts(
    server_dsn: str, events: int, runs: int, echo: Callable[[str], None], seed: int = 7
) -> dict[str, Any]:
    """Load a synthetic day of ``events`` into both layouts, each in a database created on
    ``server_dsn``'s server (dropped after), and time every query ``runs`` times on each;
    the results as a JSON-able dict."""
    day = SyntheticDay(events)
    sample = Sample.of_size(events)
    async with contextlib.AsyncExitStack() as stack:
        old_dsn = await stack.enter_async_context(database(server_dsn, "before"))
        new_dsn = await stack.enter_async_context(database(server_dsn, "after"))
        echo(f"loading {events:,} events into the old layout (one row each) ...")
        old_seconds = await load_old_layout(old_dsn, day, sample, echo)
        store = await ArchiveStore.connect(new_dsn)
        stack.push_async_callback(store.close)
        echo(f"loading {events:,} events through ArchiveStore.insert_records ...")
        new_seconds = await load_new_layout(store, day, echo)
        echo("VACUUM ANALYZE of both ...")
        await vacuum(old_dsn)
        await vacuum(new_dsn)
        old_bytes, new_bytes = await old_layout_bytes(old_dsn), await store.size_bytes()
        pool = await asyncpg.create_pool(old_dsn, min_size=1, max_size=4)
        stack.push_async_callback(pool.close)
        old, picks = OldLayout(pool), Picks(day, sample, random.Random(seed))
        queries: dict[str, Any] = {}
        for query in QUERIES:
            echo(f"timing {query.title}: {runs} runs on each ...")
            timings = await measure(query, old, store, picks, runs)
            queries[query.name] = timings.to_json()
    return {
        "events": events,
        "bytes_per_event": {"before": round(old_bytes / events, 1),
                            "after": round(new_bytes / events, 1)},
        "load_seconds": {"before": round(old_seconds, 1), "after": round(new_seconds, 1)},
        "queries": queries,
    }  # fmt: skip


async def run_query_bench(events: int, runs: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """:func:`compare_layouts` on a private PostgreSQL started for the run."""
    async with private_server() as dsn:
        return await compare_layouts(dsn, events, runs, echo)


def comparison_lines(section: Mapping[str, Any]) -> list[str]:
    """The ``queries`` section of the results as a table, with the bytes per event."""
    size, load = section["bytes_per_event"], section["load_seconds"]
    lines = [
        f"queries on {section['events']:,} events of one day, old layout (before) against "
        "the compact one (after):",
        f"  bytes per event: before {size['before']:g}, after {size['after']:g}",
        f"  load, making the records included: before {load['before']:g} s (COPY), after "
        f"{load['after']:g} s (insert_records)",
        f"  {'query':<36} {'before p50 / p95 ms':>21} {'after p50 / p95 ms':>21}"
        f" {'ratio':>6}  same",
    ]
    titles = {query.name: query.title for query in QUERIES}
    mismatches = []
    for name, r in section["queries"].items():
        if r["same_fields"]:
            same = "yes"
        else:
            what = "NO" if not r["same"] else "fields differ"
            same = f"{what} ({r['mismatched_runs'] + r['differing_runs']} of {r['runs']} runs)"
            mismatches.append(f"  {name}: {r['first_mismatch']}")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"  {titles.get(name, name):<36}"
            f" {r['before_p50_ms']:>10.2f} / {r['before_p95_ms']:<8.2f}"
            f" {r['after_p50_ms']:>10.2f} / {r['after_p95_ms']:<8.2f}"
            f" {ratio:>6}  {same}"
        )
    if mismatches:
        lines += ["  differences (after against before):", *mismatches]
    return lines
