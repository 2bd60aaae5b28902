"""The command line starts at once: subcommands are imported only when used.

Start-up time is measured, not asserted (it moves with the machine); what is asserted is
what makes it fast: ``--help`` and ``status`` import none of the heavy parts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from manager.cli import COMMANDS, main
from manager.cli.events import ARCHIVE_COMMANDS, events
from manager.cli.lazy import LazyGroup

#: Modules that take most of a second to import, and that --help and status do not need.
HEAVY = ("fastapi", "uvicorn", "asyncpg", "manager.daemon.manager", "manager.bench", "manager.soak")


def loaded_after(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter has imported after running ``multibot argv``."""
    script = (
        "import sys\n"
        "from manager.cli import main\n"
        "try:\n"
        f"    main({list(argv)!r}, prog_name='multibot')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return set(done.stderr.split())


def heavy(modules: set[str]) -> list[str]:
    """The heavy modules among ``modules``."""
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY))


@pytest.mark.parametrize(
    ("group", "table"), [(main, COMMANDS), (events, ARCHIVE_COMMANDS)], ids=["multibot", "events"]
)
def test_every_lazy_help_line_is_the_commands_own(
    group: LazyGroup, table: dict[str, tuple[str, str]]
) -> None:
    """The one-line help shown without importing a command is the one it has once loaded,
    and each entry names a real click command."""
    for name, (_, short_help) in table.items():
        command = group.load(name)
        assert isinstance(command, click.Command)
        assert command.get_short_help_str(limit=500) == short_help, name


def test_help_imports_no_command() -> None:
    """``multibot --help`` lists every command but imports none of them."""
    modules = loaded_after("--help")
    assert "manager.cli" in modules
    assert heavy(modules) == []
    assert not {"manager.cli.manager", "manager.cli.events", "structlog"} & modules


def test_status_imports_neither_daemon_nor_api_nor_logging(tmp_path: Path) -> None:
    """``multibot status --json`` (here with no manager running) loads the config and the
    control client, not the daemon, the API, the benchmarks or structlog."""
    env = {"MULTIBOT_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    modules = loaded_after("status", "--json", env=env)
    assert "manager.cli.manager" in modules
    assert heavy(modules) == []
    assert "structlog" not in modules
    assert "manager.control" not in modules  # the server side


def test_a_subcommands_own_help_loads_it() -> None:
    """Asking a command for its help imports it (its options are its own)."""
    modules = loaded_after("bench", "--help")
    assert "manager.bench.command" in modules


@pytest.mark.redis
@pytest.mark.one_redis
def test_events_publish_imports_neither_daemon_nor_api(redis_url: str) -> None:
    """``multibot events publish`` publishes through the bus alone: no daemon, no API, no
    archive driver, no benchmarks."""
    argv = ("events", "publish", "user.lazy.checked", "--redis-url", redis_url)
    modules = loaded_after(*argv, "--data", '{"n": 1}')
    assert "manager.cli.events" in modules and "bus.publisher" in modules
    assert heavy(modules) == []
