"""The README's quick start and HTTP API examples, run as written against a real manager.

The commands are read from README.md (the ``sh`` blocks of "Quick start" and of "The HTTP
API…"), so the README and this test cannot drift: a changed README command is what runs.
Each runs with ``bash -c`` against ``multibot start`` on the default config. The only
differences from a reader's shell, all explicit here:

- **Where**: a temporary directory laid out like a checkout: ``.venv`` is a symlink to this
  test's venv (``sys.prefix``), ``config/multibot.toml`` is a copy of the default config, so
  its ``data_dir = "../data"`` is the directory's ``data/``, where the README reads
  ``data/api-admin.token``. ``MULTIBOT_CONFIG`` names that copy (the installed ``multibot``
  is this checkout's, whose default config would point at the checkout's own ``data/``).
- **The API port**: the README says ``127.0.0.1:8080`` (the default config's port); the
  manager listens on a free port and ``127.0.0.1:8080`` in the commands becomes that port,
  so a manager or anything else already on 8080 does not matter.
- **curl** is a shell function adding ``--silent --show-error --write-out '\\n%{http_code}'``,
  so the test sees the status code the README promises; the command's text is unchanged.
- **events tail** runs until Ctrl-C and shows events from when it started: it is started
  first, the README's publish command runs again, the tail must print that event, then it
  gets SIGINT and must exit 0.
- ``make …`` lines are not run: they are how this test itself is run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from manager.config import DEFAULT_CONFIG_PATH, load_config
from manager.embedded.redis_server import free_port
from tests.daemon.manager_process import REPO, ManagerProcess
from tests.support import wait_until

README = REPO / "README.md"
README_API = "127.0.0.1:8080"
#: Prepended to every command: curl also prints the status code, on a last line of its own.
PRELUDE = (
    "set -e\ncurl() { command curl --silent --show-error --write-out '\\n%{http_code}' \"$@\"; }\n"
)
#: What each kind of README command is recognised by; a command of no kind fails the test.
KINDS = {
    "status": re.compile(r"\bmultibot status\b"),
    "publish": re.compile(r"\bmultibot events publish\b"),
    "tail": re.compile(r"\bmultibot events tail\b"),
    "post": re.compile(r"^curl\b.*\s(-d|--data)\s"),
    "get": re.compile(r"^curl\b"),
}
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Command:
    """One shell command of a README ``sh`` block, with the block's assignments before it."""

    text: str
    #: ``NAME=value`` lines of the same block above it (``TOKEN=$(cat …)``).
    assignments: tuple[str, ...]

    @property
    def kind(self) -> str:
        """What the command does, by :data:`KINDS`."""
        for kind, pattern in KINDS.items():
            if pattern.search(self.text):
                return kind
        raise AssertionError(f"a README command this test has no expectation for: {self.text}")


def section(markdown: str, heading: str) -> str:
    """The text under the first heading line starting with ``heading`` (``## Quick start``), up
    to the next heading of the same or a higher level (not counting lines in code blocks)."""
    lines = markdown.splitlines()
    level, start, fenced = 0, None, False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^(#+) (.*)$", line)
        if match is None:
            continue
        if start is None and line.startswith(heading):
            level, start = len(match[1]), index + 1
        elif start is not None and len(match[1]) <= level:
            return "\n".join(lines[start:index])
    assert start is not None, f"README.md has no section {heading!r}"
    return "\n".join(lines[start:])


def sh_commands(text: str) -> list[Command]:
    """The commands of the ``sh`` blocks in ``text``: continuation lines joined; blank,
    comment-only and ``make`` lines left out; assignments kept for the commands after them."""
    commands: list[Command] = []
    for block in re.findall(r"^```sh\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL):
        assignments: list[str] = []
        for raw in re.sub(r"\\\n", " ", block).splitlines():
            line = raw.strip()
            if not line or line.startswith("#") or line.startswith("make "):
                continue
            if re.match(r"^[A-Za-z_]\w*=", line):
                assignments.append(line)
            else:
                commands.append(Command(line, tuple(assignments)))
    return commands


def readme_commands() -> list[Command]:
    """The quick start's commands, then the HTTP API section's."""
    markdown = README.read_text()
    quick = sh_commands(section(markdown, "## Quick start"))
    api = sh_commands(section(markdown, "### The HTTP API"))
    return quick + api


@dataclass(frozen=True)
class Ran:
    """A finished command."""

    code: int
    stdout: str
    stderr: str


class Shell:
    """Runs README commands in ``cwd`` as a reader would, with this test's substitutions."""

    def __init__(self, cwd: Path, env: dict[str, str], port: int) -> None:
        self.cwd = cwd
        self.env = env
        self.port = port

    def script(self, command: Command) -> str:
        """The bash script for ``command``: prelude, its block's assignments, the command."""
        text = command.text
        if command.kind in ("post", "get"):
            assert README_API in text, f"the README's API example is not on {README_API}: {text}"
            text = text.replace(README_API, f"127.0.0.1:{self.port}")
        return PRELUDE + "".join(a + "\n" for a in command.assignments) + text + "\n"

    async def spawn(self, command: Command) -> asyncio.subprocess.Process:
        """Start ``command`` in a session of its own (so SIGINT reaches bash and its child)."""
        return await asyncio.create_subprocess_exec(
            "bash", "-c", self.script(command), cwd=self.cwd, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip

    async def run(self, command: Command) -> Ran:
        """Run ``command`` to its end (at most :data:`COMMAND_TIMEOUT` seconds)."""
        process = await self.spawn(command)
        try:
            out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise AssertionError(
                f"still running after {COMMAND_TIMEOUT}s: {command.text}"
            ) from None
        assert process.returncode is not None
        return Ran(process.returncode, out.decode(), err.decode())

    async def http(self, command: Command) -> tuple[int, object]:
        """Run a curl command: its status code and JSON body."""
        ran = await self.run(command)
        assert ran.code == 0, f"{command.text}\n{ran.stderr}"
        body, _, status = ran.stdout.rpartition("\n")
        return int(status), orjson.loads(body)


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A directory laid out like a checkout for the README's relative paths (``.venv``,
    ``config/``, ``data/``), that another OS user can reach: as root, the embedded
    PostgreSQL runs as one (pytest's own tmp_path sits under a 0700 directory of root)."""
    venv_bin = Path(sys.prefix) / "bin"
    if not (venv_bin / "multibot").exists():
        pytest.skip(
            f"multibot is not installed in {sys.prefix}: the README runs .venv/bin/multibot"
        )
    directory = Path(tempfile.mkdtemp(prefix="multibot-readme-"))
    directory.chmod(0o711)
    (directory / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (directory / "config").mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class TestReadmeText:
    def test_quick_start_names_every_bot_that_starts(self) -> None:
        """The quick start names each bot the default config starts."""
        quick = section(README.read_text(), "## Quick start")
        for bot in load_config(DEFAULT_CONFIG_PATH).bots:
            assert f"`{bot.id}`" in quick, f"the quick start does not mention the bot {bot.id}"

    def test_the_commands_are_found(self) -> None:
        """The README has each kind of command this test checks, and the port it rewrites."""
        commands = readme_commands()
        assert sorted({c.kind for c in commands}) == sorted(KINDS)
        assert load_config(DEFAULT_CONFIG_PATH).api.port == int(README_API.rpartition(":")[2])


# A real manager on its embedded Redis and PostgreSQL (nothing Redis-version-specific).
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
class TestRunAsWritten:
    async def test_readme_commands_work_as_written(self, checkout: Path) -> None:
        """status lists the bots, publish prints an id, tail shows a published event, the API
        answers 202 {"ids": [...]} to the POST and 200 to the query, which finds the event."""
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed: the README's API examples use it")
        port = free_port()
        manager = ManagerProcess(
            checkout / "config",
            DEFAULT_CONFIG_PATH.read_text(),
            environ={"MULTIBOT_DATA_DIR": str(checkout / "data"), "MULTIBOT_API__PORT": str(port)},
        )
        env = {**os.environ, "MULTIBOT_CONFIG": str(manager.config_path)}
        for name in ("MULTIBOT_REDIS_URL", "MULTIBOT_NAMESPACE", "MULTIBOT_DATA_DIR"):
            env.pop(name, None)  # as in a fresh shell: the commands find the manager themselves
        shell = Shell(checkout, env, port)
        try:
            await manager.start()
            await _run_all(shell, readme_commands())
            assert await manager.terminate() == 0
        finally:
            await manager.kill()


async def _run_all(shell: Shell, commands: list[Command]) -> None:
    """Run the README's commands in order, each checked for what the README promises."""
    bots = [bot.id for bot in load_config(DEFAULT_CONFIG_PATH).bots]
    posted: list[str] = []
    for command in commands:
        match command.kind:
            case "status":
                ran = await shell.run(command)
                assert ran.code == 0, ran.stderr
                assert all(bot in ran.stdout for bot in bots), ran.stdout
            case "publish":
                await _publish(shell, command)
            case "tail":
                publish = next(c for c in commands if c.kind == "publish")
                await _tail(shell, command, publish)
            case "post":
                status, body = await shell.http(command)
                assert status == 202, body
                assert isinstance(body, dict) and list(body) == ["ids"]
                (event_id,) = body["ids"]
                posted.append(event_id)
            case "get":
                status, body = await shell.http(command)
                assert status == 200, body
                assert isinstance(body, dict) and isinstance(body["events"], list)
                assert "next_cursor" in body
                await _wait_found(shell, command, posted)


async def _publish(shell: Shell, command: Command) -> str:
    """Run the publish command: exit 0, the event id on stdout, the Redis named on stderr."""
    ran = await shell.run(command)
    assert ran.code == 0, ran.stderr
    event_id = ran.stdout.strip()
    assert uuid.UUID(event_id).version == 7, ran.stdout
    assert "the manager running on" in ran.stderr, ran.stderr
    return event_id


async def _tail(shell: Shell, command: Command, publish: Command) -> None:
    """Start the tail, publish with the README's command, see the event; Ctrl-C ends it."""
    process = await shell.spawn(command)
    assert process.stdout is not None and process.stderr is not None
    try:
        banner = b""
        while not banner.startswith(b"Tailing "):
            banner = await asyncio.wait_for(process.stderr.readline(), COMMAND_TIMEOUT)
            assert banner, f"the tail ended before its banner: {command.text}"
        event_id = await _publish(shell, publish)
        shown = b""
        while event_id.encode() not in shown:
            shown = await asyncio.wait_for(process.stdout.readline(), COMMAND_TIMEOUT)
            assert shown, f"the tail ended without printing {event_id}"
        os.killpg(process.pid, signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), COMMAND_TIMEOUT) == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def _wait_found(shell: Shell, command: Command, event_ids: list[str]) -> None:
    """Run the query again until it finds the events posted before (the archive is async)."""

    async def found() -> bool:
        status, body = await shell.http(command)
        assert status == 200, body
        assert isinstance(body, dict)
        shown = {event["id"] for event in body["events"]}
        return set(event_ids) <= shown

    await wait_until(found, 30, f"the query to find {event_ids}")
