"""``multibot events query`` and ``events trace`` against a real archive."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from bus import Event
from bus.archive.store import ArchiveStore
from bus.keys import Keys
from manager.cli import main
from manager.embedded.postgres_server import PostgresServer

pytestmark = pytest.mark.postgres


def _at(event: Event, n: int) -> Event:
    return event.with_delivery(Keys().stream("user"), f"{1_700_000_000_000 + n}-0")


async def _chain(store: ArchiveStore) -> tuple[Event, Event, Event]:
    """A three-hop chain and one unrelated event, archived five minutes ago."""
    now = datetime.now(UTC) - timedelta(minutes=5)
    root = Event("user.message.received", {"user_id": 1, "text": "hi"}, "api:web", timestamp=now)
    child = replace(root.caused("user.message.sent", {"user_id": 1}, "greeter"), timestamp=now)
    grandchild = replace(
        child.caused("multibot.user.handover", {"user_id": 1}, "matcher"), timestamp=now
    )
    other = Event("user.message.received", {"user_id": 2}, "api:web", timestamp=now)
    await store.insert_events([_at(e, n) for n, e in enumerate((root, child, grandchild, other))])
    return root, child, grandchild


async def deep_chain(store: ArchiveStore, hops: int) -> list[Event]:
    """A chain ``hops`` events long, each caused by the one before (a bot answering itself),
    one millisecond apart, archived; the events in causation order."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    chain = [Event("bot.loop.step", {"n": 0}, "looper", timestamp=start)]
    for n in range(1, hops):
        step = chain[-1].caused("bot.loop.step", {"n": n}, "looper")
        chain.append(replace(step, timestamp=start + timedelta(milliseconds=n)))
    await store.insert_events([_at(e, n) for n, e in enumerate(chain)])
    return chain


async def run(*args: str, dsn: str) -> tuple[int, str, str]:
    """The CLI in a thread (it runs its own event loop); (exit code, stdout, stderr)."""
    argv = ["events", *args, "--postgres-dsn", dsn]
    result = await asyncio.to_thread(CliRunner().invoke, main, argv)
    return result.exit_code, result.stdout, result.stderr


class TestTrace:
    async def test_three_hop_chain_as_a_tree(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """trace prints the chain by causation, each hop indented under its cause."""
        root, child, grandchild = await _chain(store)
        code, out, _ = await run("trace", root.id, dsn=postgres_server.dsn)
        assert code == 0
        lines = out.splitlines()
        assert len(lines) == 3
        assert "user.message.received" in lines[0]
        assert not lines[0].startswith(" ")
        assert lines[1].startswith("  └─ ")
        assert "user.message.sent" in lines[1]
        assert lines[2].startswith("    └─ ")
        assert "multibot.user.handover" in lines[2]
        code, out, _ = await run("trace", root.id, "--json", dsn=postgres_server.dsn)
        assert code == 0
        nodes = [json.loads(line) for line in out.splitlines()]
        assert [(n["id"], n["parent_id"], n["depth"]) for n in nodes] == [
            (root.id, None, 0),
            (child.id, root.id, 1),
            (grandchild.id, child.id, 2),
        ]

    async def test_a_chain_deeper_than_json_nests_prints_in_both_forms(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """A chain 600 hops deep (recursion and JSON nesting both gave out before) prints
        every hop: the text indents at most 20 levels, then shows each depth; --json gives
        one line per event with its parent and depth."""
        chain = await deep_chain(store, 600)
        code, out, err = await run("trace", chain[0].id, dsn=postgres_server.dsn)
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 600
        assert all(f"n={n}" in line for n, line in enumerate(lines))
        assert max(len(line) - len(line.lstrip(" ")) for line in lines) == 40
        assert lines[20].startswith(" " * 40 + "└─ ")
        assert lines[21].startswith(" " * 40 + "└─[21] ")
        assert lines[599].startswith(" " * 40 + "└─[599] ")
        code, out, err = await run("trace", chain[0].id, "--json", dsn=postgres_server.dsn)
        assert code == 0, err
        nodes = [json.loads(line) for line in out.splitlines()]
        assert [(n["id"], n["parent_id"], n["depth"]) for n in nodes] == [
            (e.id, chain[n - 1].id if n else None, n) for n, e in enumerate(chain)
        ]

    async def test_unknown_chain_is_an_error(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """A correlation id nothing has: exit 1 saying so."""
        code, _, err = await run("trace", "nope", dsn=postgres_server.dsn)
        assert code == 1
        assert "no archived event has correlation id nope" in err


class TestQuery:
    async def test_filters_and_json(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """--type, --source, --where and --since narrow the result; --json prints events."""
        root, _, _ = await _chain(store)
        code, out, _ = await run(
            "query", "--type", "user.message.*", "--where", '{"user_id": 1}', "--since", "1h",
            "--json", dsn=postgres_server.dsn,
        )  # fmt: skip
        assert code == 0
        found = [json.loads(line) for line in out.splitlines()]
        assert [e["type"] for e in found] == ["user.message.received", "user.message.sent"]
        assert found[0]["id"] == root.id
        code, out, _ = await run("query", "--source", "matcher", dsn=postgres_server.dsn)
        assert code == 0
        assert len(out.splitlines()) == 1
        code, out, _ = await run("query", "--since", "1m", dsn=postgres_server.dsn)
        assert (code, out) == (0, "")

    async def test_paging_prints_where_to_continue(
        self, store: ArchiveStore, postgres_server: PostgresServer
    ) -> None:
        """--limit cuts the page and says how to get the next one; --after continues."""
        await _chain(store)
        code, out, err = await run("query", "--limit", "3", dsn=postgres_server.dsn)
        assert code == 0
        assert len(out.splitlines()) == 3
        cursor = err.strip().removeprefix("more: --after ")
        code, out, err = await run("query", "--after", cursor, dsn=postgres_server.dsn)
        assert (code, len(out.splitlines()), err) == (0, 1, "")

    async def test_bad_input_is_a_usage_error(self, postgres_server: PostgresServer) -> None:
        """A bad pattern, bad JSON or a bad time is refused before connecting."""
        for args in (("--type", "user..x"), ("--where", "{oops"), ("--since", "yesterday")):
            code, _, err = await run("query", *args, dsn=postgres_server.dsn)
            assert code == 2, (args, err)

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("--since", "99999999999d"),
            ("--since", "36501d"),
            ("--until", "9" * 5000 + "s"),
            ("--since", "0001-01-01T00:00:00+05:00"),
            ("--until", "9999-12-31T23:59:59-05:00"),
        ],
    )
    async def test_time_out_of_range_is_a_usage_error(
        self, postgres_server: PostgresServer, option: str, value: str
    ) -> None:
        """A duration or time past what a date holds: exit 2 saying the range, no traceback."""
        code, _, err = await run("query", option, value, dsn=postgres_server.dsn)
        assert code == 2, err
        assert "out of range" in err
        assert "leave the option out" in err
        assert "Traceback" not in err
