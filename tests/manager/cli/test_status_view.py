"""Tests for manager.cli.status_view: what `multibot status` shows a person."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from manager.cli.status_view import format_duration, render_status
from manager.status import ManagerStatus

MiB, GiB = 1024**2, 1024**3


def instance(number: int, **fields: Any) -> dict[str, Any]:
    """A running instance of a bot, with ``fields`` overriding the defaults."""
    return {
        "instance": number,
        "pid": 5000 + number,
        "state": "running",
        "role": None,
        "uptime": 192.0,
        "restarts": 0,
        "rss": 100 * MiB,
        "heartbeat_age": 1.0,
        "last_exit": None,
    } | fields


def make_status() -> dict[str, Any]:
    """A status document: two bots (one failed), one stopped with no instances, two groups."""
    return {
        "manager": {
            "pid": 4242,
            "version": "0.1.0",
            "uptime": 7530.0,
            "rss": 80 * MiB,
            "data_dir": "/var/lib/multibot",
            "redis": "redis://:s3cret@127.0.0.1:6379/0",
            "postgres": "postgresql://multibot@127.0.0.1:5432/multibot",
            "maintenance": True,
            "ready": True,
            "api": "http://127.0.0.1:8080",
        },
        "memory": {
            "budget": 2 * GiB,
            "used": 1100 * MiB,
            "manager": 80 * MiB,
            "bots": 900 * MiB,
            "redis": 120 * MiB,
        },
        "bots": [
            {
                "id": "greeter",
                "state": "running",
                "restarts": 1,
                "replicas": 2,
                "standby": True,
                "instances": [
                    instance(0, role="active", last_exit="exit 1"),
                    instance(1, role="standby", state="standby", heartbeat_age=95.0),
                ],
            },
            {
                "id": "crashy",
                "state": "failed",
                "restarts": 5,
                "replicas": 1,
                "standby": False,
                "instances": [
                    instance(
                        0,
                        pid=None,
                        state="failed",
                        uptime=None,
                        restarts=5,
                        rss=None,
                        heartbeat_age=None,
                        last_exit="exit 1: [bold]boom[/bold]",
                    )
                ],
            },
            {
                "id": "idle",
                "state": "stopped",
                "restarts": 0,
                "replicas": 0,
                "standby": False,
                "instances": [],
            },
        ],
        "groups": [
            {
                "stream": "multibot:stream:{user}",
                "group": "bot-group-greeter",
                "lag": 12,
                "lag_capped": False,
                "pending": 3,
                "consumers": 2,
            },
            {
                "stream": "multibot:stream:{user}",
                "group": "bot-group-crashy",
                "lag": 100_000,
                "lag_capped": True,
                "pending": 0,
                "consumers": 0,
            },
        ],
    }


def render(status: dict[str, Any], **console: Any) -> str:
    """What render_status prints on a 140-column console writing to a string."""
    out = io.StringIO()
    render_status(ManagerStatus.model_validate(status), Console(file=out, width=140, **console))
    return out.getvalue()


def line_of(text: str, *words: str) -> str:
    """The one line of ``text`` containing all ``words``."""
    (line,) = [line for line in text.splitlines() if all(w in line for w in words)]
    return line


class TestRenderStatus:
    def test_header(self) -> None:
        """The header names version, pid, uptime, readiness, maintenance and endpoints."""
        text = render(make_status())
        first = line_of(text, "multibot 0.1.0")
        for part in ("pid 4242", "up 2h 5m", "ready", "maintenance on"):
            assert part in first
        endpoints = line_of(text, "redis redis://")
        assert "127.0.0.1:6379/0" in endpoints and "s3cret" not in text
        assert "postgres postgresql://multibot@127.0.0.1:5432/multibot" in endpoints
        assert line_of(text, "api ").startswith("api http://127.0.0.1:8080")

    def test_a_deployment_of_several_managers_lists_each(self) -> None:
        """With more than one manager: each host, which coordinates, which is gone, and
        its bots; with one, no such lines."""
        hosts = [
            {"host": "a", "pid": 1, "version": "0.1.0", "bots": ["idler"], "seen_ago": 9.0,
             "live": False, "coordinator": False},
            {"host": "b", "pid": 2, "version": "0.1.0", "bots": ["collector", "emitter"],
             "seen_ago": 0.2, "live": True, "coordinator": True},
        ]  # fmt: skip
        status = {**make_status(), "deployment": {"host": "b", "coordinator": "b", "hosts": hosts}}
        text = render(status)
        assert "deployment: this is b" in text
        assert line_of(text, "  a  ").split()[:2] == ["a", "gone"]
        assert "coordinator" in line_of(text, "  b  ") and "collector, emitter" in text
        alone = {**status, "deployment": {"host": "b", "coordinator": "b", "hosts": hosts[1:]}}
        assert "deployment:" not in render(alone)

    def test_budget_line(self) -> None:
        """Memory use reads as used / budget (share), broken down into its parts."""
        line = line_of(render(make_status()), "memory")
        assert "1.1 GiB / 2.0 GiB (54%)" in line
        assert "manager 80.0 MiB" in line and "bots 900.0 MiB" in line
        assert "redis 120.0 MiB" in line

    def test_redis_memory_line_names_what_holds_publishers_back(self) -> None:
        """Redis's use of its maxmemory; under backpressure, which group holds which
        stream; without a maxmemory, a warning."""
        status = make_status() | {
            "redis_memory": {
                "used": 820 * MiB,
                "maxmemory": GiB,
                "backpressure": True,
                "holders": [
                    {"stream": "user", "group": "archiver", "since_id": "17-0", "pending": 0}
                ],
            }
        }
        text = render(status)
        assert "redis 820.0 MiB / 1.0 GiB maxmemory  BACKPRESSURE" in text
        assert "held by group archiver on stream user (from entry 17-0" in text
        status["redis_memory"] = {"used": MiB, "maxmemory": 0, "backpressure": False}
        assert "redis maxmemory unset: nothing bounds Redis" in render(status)

    def test_one_row_per_instance(self) -> None:
        """Each instance is a row with its bot, state, pid, uptime, RSS and heartbeat."""
        text = render(make_status())
        active = line_of(text, "greeter", "active")
        for cell in ("running", "5000", "3m 12s", "100.0 MiB", "1s", "exit 1"):
            assert cell in active
        standby = line_of(text, "greeter", "standby", "5001")
        assert "1m 35s" in standby

    def test_failed_row(self) -> None:
        """A failed instance shows its state, its restarts, "-" for what it lacks, and its
        exit message as written (not as markup)."""
        row = line_of(render(make_status()), "crashy", "failed")
        assert row.split()[:4] == ["crashy", "0", "-", "failed"]
        assert "exit 1: [bold]boom[/bold]" in row
        assert "5" in row.split()

    def test_bot_without_instances(self) -> None:
        """A bot with no instances still gets a row with its own state."""
        assert line_of(render(make_status()), "idle").split()[:4] == ["idle", "-", "-", "stopped"]

    def test_outboxes_not_relayed_are_named(self) -> None:
        """Bots whose outbox holds events get one line naming them and how many; none when
        every outbox is empty or Redis did not say."""
        status = make_status()
        assert "not relayed" not in render(status)
        status["bots"][0]["outbox"] = 1200
        status["bots"][1]["outbox"] = 0
        line = line_of(render(status), "not relayed")
        assert line == "published, not relayed to their streams yet: greeter 1200"

    def test_groups(self) -> None:
        """Each group shows its stream, lag, pending and consumers; a capped lag ends in +."""
        text = render(make_status())
        assert line_of(text, "bot-group-greeter").split() == [
            "multibot:stream:{user}",
            "bot-group-greeter",
            "12",
            "3",
            "2",
        ]
        assert "100000+" in line_of(text, "bot-group-crashy")

    def test_empty_fleet(self) -> None:
        """No bots and no groups render without error, saying so."""
        status = make_status() | {"bots": [], "groups": []}
        text = render(status)
        assert "bots: none" in text and "groups: none" in text
        assert "multibot 0.1.0" in text

    def test_unknown_values_show_dashes(self) -> None:
        """None in the header and memory prints "-", with no share of an unknown budget."""
        status = make_status()
        status["manager"] |= {"uptime": None, "postgres": None, "ready": None}
        status["memory"] = dict.fromkeys(status["memory"])
        text = render(status)
        assert "up -" in text and "postgres -" in text and "ready -" in text
        assert "memory - / -  manager -" in text

    def test_plain_when_not_a_terminal(self) -> None:
        """Output to a non-terminal has no escape codes, even with a colour system set."""
        assert "\x1b[" not in render(make_status(), color_system="truecolor")

    def test_colour_on_a_terminal(self) -> None:
        """On a terminal the failed row is red and the stale heartbeat yellow."""
        text = render(make_status(), force_terminal=True, color_system="standard")
        assert "\x1b[31mcrashy" in line_of(text, "crashy", "failed")
        assert "\x1b[33m" in line_of(text, "greeter", "5001")
        assert "\x1b[31m" not in line_of(text, "greeter", "5000")


class TestFormatDuration:
    @pytest.mark.parametrize(
        ("seconds", "expected"),
        [
            (None, "-"),
            (-1.0, "-"),
            (float("nan"), "-"),
            (0.4, "0s"),
            (45.9, "45s"),
            (192.0, "3m 12s"),
            (7530.0, "2h 5m"),
            (3 * 86_400 + 4 * 3600 + 5, "3d 4h"),
        ],
    )
    def test_format(self, seconds: float | None, expected: str) -> None:
        """Two units at most, largest first; unknown as "-"."""
        assert format_duration(seconds) == expected


class TestArchiveLine:
    def test_archive_health_is_shown(self) -> None:
        """The archiver's state: ok with its counts, or failing with the error."""
        import io

        from rich.console import Console

        from manager.cli.status_view import render_status

        for archive, expected in (
            ({"healthy": True, "archived": 12, "dead_letters": 1}, "archive ok  12 events"),
            ({"healthy": False, "last_error": "OSError: refused"}, "failing: OSError: refused"),
            ({"healthy": True, "archived": 40, "held": 8}, "archived this run, 8 held for a full"),
        ):
            out = io.StringIO()
            status = ManagerStatus.model_validate(make_status() | {"archive": archive})
            render_status(status, Console(file=out, width=140))
            assert expected in out.getvalue()


class TestBotUsersLine:
    def test_who_the_bots_run_as(self) -> None:
        """The OS users the bots run as; none: the sharing is said plainly; unknown: nothing."""
        status = make_status()
        status["manager"]["bot_users"] = ["multibot-bot", "nobody:nogroup"]
        text = render(status)
        assert line_of(text, "OS users") == "bots run as OS users multibot-bot, nobody:nogroup"
        status["manager"]["bot_users"] = []
        text = render(status)
        assert (
            line_of(text, "isolation") == "bots share the manager's user: isolation is Redis-only"
        )
        text = render(make_status())
        assert "OS users" not in text and "isolation" not in text
