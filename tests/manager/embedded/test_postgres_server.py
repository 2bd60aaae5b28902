"""Tests for manager.embedded.postgres_server (finding binaries, running a private
PostgreSQL) and for manager.embedded.child_process, which it uses to run the server as
another user, tied to its parent."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import psutil
import pytest
import uvloop
from structlog.testing import capture_logs

from manager.embedded.child_process import OsUser, child_setup, die_with_parent
from manager.embedded.postgres_binaries import (
    PostgresBinaries,
    bundled_postgres,
    choose_postgres,
    find_postgres,
    system_postgres,
)
from manager.embedded.postgres_server import PostgresServer
from manager.errors import EmbeddedServiceError, ManagerError
from tests.postgres_fixtures import PostgresFactory, copy_cluster, gone
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[3]
OLD = PostgresBinaries(Path("/usr/lib/postgresql/12/bin"), (12, 17))
SYSTEM = PostgresBinaries(Path("/usr/lib/postgresql/15/bin"), (15, 20))
BUNDLED = PostgresBinaries(Path("/venv/pgserver/pginstall/bin"), (16, 2))
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def _has_user(name: str) -> bool:
    try:
        OsUser.named(name)
    except KeyError:
        return False
    return True


async def fetchval(dsn: str, query: str, *args: object) -> Any:
    """Run one query on a fresh connection and return the first value."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def execute(dsn: str, *statements: str) -> None:
    """Run statements on a fresh connection."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


class TestChoosePostgres:
    def test_prefers_system_when_new_enough(self) -> None:
        """System binaries >= the minimum win over the bundled ones."""
        assert choose_postgres(SYSTEM, BUNDLED) is SYSTEM

    def test_falls_back_to_bundled(self) -> None:
        """Too old or missing system binaries give way to pgserver's."""
        assert choose_postgres(OLD, BUNDLED) is BUNDLED
        assert choose_postgres(None, BUNDLED) is BUNDLED

    def test_raises_with_advice_when_nothing_fits(self) -> None:
        """With nothing usable the error names what was found and what to do."""
        with pytest.raises(EmbeddedServiceError, match="pip install pgserver") as info:
            choose_postgres(OLD, None)
        assert "12.17" in str(info.value)
        assert "MULTIBOT_POSTGRES_DSN" in str(info.value)
        assert isinstance(info.value, ManagerError)


class TestBinaries:
    def test_find_returns_runnable_binaries(self) -> None:
        """find_postgres returns a bin dir with postgres and initdb, version 13 or later."""
        binaries = find_postgres()
        assert binaries.version >= (13, 0)
        assert binaries.runnable()
        assert str(binaries) == f"PostgreSQL {binaries.version_str} ({binaries.bin_dir})"

    def test_system_is_newest_installed(self) -> None:
        """The system pick is the newest major under /usr/lib/postgresql."""
        majors = [int(p.name) for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit()]
        if not majors:
            pytest.skip("no /usr/lib/postgresql/<major>")
        system = system_postgres()
        assert system is not None
        assert system.version[0] == max(majors)

    def test_bundled_is_pgservers(self) -> None:
        """The pgserver wheel's binaries are found (without importing it), version 16.x."""
        bundled = bundled_postgres()
        if bundled is None:
            pytest.skip("pgserver is not installed")
        assert bundled.version[0] == 16
        assert bundled.bin_dir.parts[-3:] == ("pgserver", "pginstall", "bin")
        assert "pgserver" not in sys.modules

    @pytest.mark.postgres
    async def test_bundled_binaries_run_a_server(self, postgres_factory: PostgresFactory) -> None:
        """A server on pgserver's binaries (its own initdb) answers queries."""
        bundled = bundled_postgres()
        if bundled is None:
            pytest.skip("pgserver is not installed")
        server = await postgres_factory(binaries=bundled, template=False)
        assert await fetchval(server.dsn, "SHOW server_version_num") >= "160000"


@pytest.mark.postgres
class TestStart:
    async def test_answers_queries(self, postgres_server: PostgresServer) -> None:
        """A started server takes logins on its DSN, into the multibot database."""
        assert postgres_server.dsn == (
            f"postgresql://multibot@127.0.0.1:{postgres_server.port}/multibot?sslmode=disable"
        )
        assert await fetchval(postgres_server.dsn, "SELECT current_database()") == "multibot"
        assert await fetchval(postgres_server.dsn, "SELECT current_setting('server_encoding')") == (
            "UTF8"
        )
        assert postgres_server.running

    async def test_repr_shows_version_port_user_and_pid(
        self, postgres_server: PostgresServer
    ) -> None:
        """repr names the version, port, OS user, pid and state."""
        assert postgres_server.binaries is not None
        assert repr(postgres_server) == (
            f"<PostgresServer {postgres_server.binaries.version_str} "
            f"port={postgres_server.port} user={postgres_server.os_user} "
            f"pid={postgres_server.pid} running>"
        )

    async def test_logs_start_with_port_pid_and_version(
        self, postgres_factory: PostgresFactory
    ) -> None:
        """start() logs one event carrying the port, pid, version and user."""
        with capture_logs() as logs:
            server = await postgres_factory()
        started = [entry for entry in logs if entry["event"] == "postgres_server.started"]
        assert len(started) == 1
        assert started[0]["pid"] == server.pid
        assert started[0]["port"] == server.port
        assert started[0]["version"] == (server.binaries and server.binaries.version_str)
        assert started[0]["initdb"] is False  # started on a copy of the template cluster

    async def test_context_manager_starts_and_stops(
        self, postgres_dir: Path, postgres_template: Path
    ) -> None:
        """`async with` starts the server on entry and stops it on exit."""
        server = PostgresServer(postgres_dir / "pg")
        copy_cluster(postgres_template, server)
        assert not server.running
        assert server.port is None
        async with server:
            pid = server.pid
            assert await fetchval(server.dsn, "SELECT 1") == 1
        assert not server.running
        assert server.pid is None
        assert pid is not None
        assert gone(pid)

    async def test_start_when_running_raises(self, postgres_server: PostgresServer) -> None:
        """Starting a running server is refused with a pointer to restart()."""
        with pytest.raises(EmbeddedServiceError, match="restart"):
            await postgres_server.start()

    async def test_serves_on_socket_only(self, postgres_factory: PostgresFactory) -> None:
        """unix_socket mode listens on a socket (mode 700) in data_dir, not on TCP."""
        server = await postgres_factory(unix_socket=True)
        assert server.port is None
        assert server.dsn == (f"postgresql://multibot@/multibot?host={server.data_dir}&port=5432")
        assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
        assert await fetchval(server.dsn, "SELECT 1") == 1
        assert await fetchval(server.dsn, "SHOW listen_addresses") == ""

    def test_too_long_socket_path_refused(self, tmp_path: Path) -> None:
        """A socket path longer than the OS allows is refused up front."""
        with pytest.raises(EmbeddedServiceError, match="shorter data_dir"):
            PostgresServer(tmp_path / ("d" * 120), unix_socket=True)


@pytest.mark.postgres
class TestPersistence:
    async def test_data_survives_restart(self, postgres_server: PostgresServer) -> None:
        """A table and its rows are there after a stop and a start, on the same port."""
        await execute(
            postgres_server.dsn, "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (7)"
        )
        port, pid = postgres_server.port, postgres_server.pid
        await postgres_server.stop()
        await postgres_server.start()
        assert postgres_server.port == port
        assert postgres_server.pid != pid
        assert await fetchval(postgres_server.dsn, "SELECT x FROM kept") == 7

    async def test_recovers_after_kill(self, postgres_server: PostgresServer) -> None:
        """After kill() (SIGKILL, a crash) the next start recovers committed rows."""
        await execute(
            postgres_server.dsn, "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (1)"
        )
        pid = postgres_server.pid
        assert pid is not None
        backends = psutil.Process(pid).children()
        await postgres_server.kill()
        assert not postgres_server.running
        assert gone(pid)
        await wait_until(lambda: all(gone(b.pid) for b in backends), what="backends to die")

        await postgres_server.restart()
        assert await fetchval(postgres_server.dsn, "SELECT x FROM kept") == 1

    async def test_two_servers_side_by_side(self, postgres_factory: PostgresFactory) -> None:
        """Servers on two data dirs run at once, each with its own port, process and data."""
        first, second = await postgres_factory(), await postgres_factory()
        assert first.port != second.port
        assert first.pid != second.pid
        await execute(first.dsn, "CREATE TABLE only_first (x int)")
        query = "SELECT to_regclass('only_first') IS NOT NULL"
        assert await fetchval(first.dsn, query) is True
        assert await fetchval(second.dsn, query) is False


@pytest.mark.postgres
class TestPassword:
    async def test_password_required(self, postgres_factory: PostgresFactory) -> None:
        """With a password the DSN carries it (escaped); a wrong or missing one is refused."""
        server = await postgres_factory(password="s3cr:t/@ pw")
        assert server.dsn.startswith("postgresql://multibot:s3cr%3At%2F%40%20pw@127.0.0.1:")
        assert await fetchval(server.dsn, "SELECT 1") == 1
        base = f"postgresql://multibot{{}}@127.0.0.1:{server.port}/multibot"
        with pytest.raises(asyncpg.InvalidPasswordError):
            await fetchval(base.format(":wrong"), "SELECT 1")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await fetchval(base.format(""), "SELECT 1")

        await server.stop()
        other = PostgresServer(server.data_dir, password="another", port=server.port)
        with pytest.raises(EmbeddedServiceError, match="password it was created with"):
            await other.start(timeout=10)
        assert not other.running


@pytest.mark.postgres
class TestStop:
    async def test_stop_is_idempotent(self, postgres_server: PostgresServer) -> None:
        """stop() and kill() on a stopped server do nothing."""
        await postgres_server.stop()
        await postgres_server.stop()
        await postgres_server.kill()
        assert not postgres_server.running

    async def test_stop_kills_a_server_that_does_not_exit(
        self, postgres_server: PostgresServer
    ) -> None:
        """A postmaster that ignores fast shutdown (stopped here) is SIGKILLed after timeout."""
        pid = postgres_server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the SIGINT stays pending, never acted on
        with capture_logs() as logs:
            await postgres_server.stop(timeout=0.2)
        assert logs[0]["event"] == "postgres_server.stop_timeout"
        assert gone(pid)


@pytest.mark.postgres
class TestStartFailure:
    async def test_bad_binary_dir(self, postgres_dir: Path) -> None:
        """Binaries that are not there fail start() saying which dir and what to do."""
        missing = PostgresBinaries(postgres_dir / "nowhere", (15, 0))
        server = PostgresServer(postgres_dir / "pg", binaries=missing)
        with pytest.raises(EmbeddedServiceError, match="nowhere holds no runnable") as info:
            await server.start()
        assert "pip install pgserver" in str(info.value)

    async def test_broken_server_binary_reported_with_its_output(
        self, postgres_dir: Path, postgres_template: Path
    ) -> None:
        """A bin dir whose postgres exits at once fails start() with what it printed."""
        bin_dir = postgres_dir / "bin"
        bin_dir.mkdir()
        bin_dir.chmod(0o755)
        (bin_dir / "initdb").symlink_to(find_postgres().initdb)
        (bin_dir / "postgres").write_text("#!/bin/sh\necho broken binary >&2\nexit 3\n")
        (bin_dir / "postgres").chmod(0o755)
        version = (int((postgres_template / "PG_VERSION").read_text()), 0)
        server = PostgresServer(postgres_dir / "pg", binaries=PostgresBinaries(bin_dir, version))
        copy_cluster(postgres_template, server)
        with pytest.raises(EmbeddedServiceError, match="exited with code 3 during startup") as info:
            await server.start()
        assert str(info.value).endswith("its log says:\nbroken binary")
        assert not server.running

    async def test_port_taken_by_a_listener(
        self, postgres_dir: Path, postgres_template: Path
    ) -> None:
        """A port held by a foreign listener fails start() with PostgreSQL's reason."""
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            server = PostgresServer(postgres_dir / "pg", port=other.getsockname()[1])
            copy_cluster(postgres_template, server)
            with pytest.raises(EmbeddedServiceError, match="during startup") as info:
                await server.start(timeout=10)
        assert "could not bind" in str(info.value)
        assert not server.running

    async def test_port_of_another_server_not_mistaken_for_ours(
        self, postgres_server: PostgresServer, postgres_dir: Path, postgres_template: Path
    ) -> None:
        """A second server on a running one's port fails; the running one is not taken for it."""
        server = PostgresServer(postgres_dir / "second", port=postgres_server.port)
        copy_cluster(postgres_template, server)
        with pytest.raises(EmbeddedServiceError, match="during startup"):
            await server.start(timeout=10)
        assert await fetchval(postgres_server.dsn, "SELECT 1") == 1

    async def test_other_major_version_refused(
        self, postgres_dir: Path, postgres_template: Path
    ) -> None:
        """A cluster of another major version is refused with the ways out."""
        server = PostgresServer(postgres_dir / "pg")
        copy_cluster(postgres_template, server)
        (server.pgdata / "PG_VERSION").write_text("12\n")
        with pytest.raises(EmbeddedServiceError, match=r"PostgreSQL 12 cluster.*pg_upgrade"):
            await server.start()


@pytest.mark.postgres
@as_root
class TestAsRoot:
    async def test_runs_as_postgres_by_default(self, postgres_server: PostgresServer) -> None:
        """As root the server runs as `postgres` (else `nobody`), owning data_dir."""
        expected = "postgres" if _has_user("postgres") else "nobody"
        assert postgres_server.os_user is not None
        assert postgres_server.os_user.name == expected
        assert psutil.Process(postgres_server.pid).username() == expected
        assert postgres_server.data_dir.stat().st_uid == postgres_server.os_user.uid
        assert stat.S_IMODE(postgres_server.data_dir.stat().st_mode) == 0o700

    async def test_run_as_another_user(self, postgres_factory: PostgresFactory) -> None:
        """run_as picks the OS user; a cluster owned by another is handed over."""
        server = await postgres_factory(run_as="nobody")
        assert psutil.Process(server.pid).username() == "nobody"
        assert (server.pgdata / "base").stat().st_uid == OsUser.named("nobody").uid

    @pytest.mark.parametrize(
        ("run_as", "message"), [("no-such-user-x", "no OS user"), ("root", "is root")]
    )
    async def test_bad_run_as_refused(self, postgres_dir: Path, run_as: str, message: str) -> None:
        """run_as naming no user, or root, is refused before anything runs."""
        server = PostgresServer(postgres_dir / "pg", run_as=run_as)
        with pytest.raises(EmbeddedServiceError, match=message):
            await server.start()

    async def test_unreachable_data_dir_refused(self, postgres_dir: Path) -> None:
        """A data dir behind a directory closed to the server's user fails with what to do."""
        closed = postgres_dir / "closed"
        closed.mkdir(mode=0o700)
        server = PostgresServer(closed / "pg", run_as="nobody")
        with pytest.raises(EmbeddedServiceError, match=f"chmod o\\+x {closed}`"):
            await server.start()

    async def test_initdb_through_parents_it_created(
        self, postgres_factory: PostgresFactory, postgres_dir: Path
    ) -> None:
        """Parents start() creates under a 077 umask are opened (o+x) for initdb's user."""
        old_umask = os.umask(0o077)
        try:
            server = await postgres_factory(
                data_dir=postgres_dir / "a" / "b" / "pg", run_as="nobody", template=False
            )
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE((postgres_dir / "a").stat().st_mode) == 0o701
        assert await fetchval(server.dsn, "SELECT current_user") == "multibot"


# Starts a PostgresServer on the data dir argv[1] under the loop argv[2], runs a query,
# prints the postmaster's pid and waits to be killed.
SERVER_SCRIPT = """
import asyncio, sys
from pathlib import Path
import asyncpg, uvloop
from manager.embedded.postgres_server import PostgresServer

async def main():
    server = PostgresServer(Path(sys.argv[1]))
    await server.start()
    conn = await asyncpg.connect(server.dsn)
    await conn.fetchval("SELECT 1")
    await conn.close()
    print(f"postmaster={server.pid}", flush=True)
    await asyncio.Event().wait()

(uvloop.run if sys.argv[2] == "uvloop" else asyncio.run)(main())
"""


async def _read_marker(stream: asyncio.StreamReader, prefix: str) -> int:
    """Read lines until one starts with ``prefix``; return the number after it."""
    while line := (await stream.readline()).decode():
        if line.startswith(prefix):
            return int(line[len(prefix) :])
    raise AssertionError(f"no {prefix!r} line before end of output")


@pytest.mark.postgres
@linux_only
class TestDiesWithParent:
    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    async def test_server_dies_with_its_parent(
        self, postgres_dir: Path, postgres_template: Path, loop: str
    ) -> None:
        """When the process running a PostgresServer is SIGKILLed, the postmaster dies too."""
        data_dir = postgres_dir / "pg"
        copy_cluster(postgres_template, PostgresServer(data_dir))
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SERVER_SCRIPT, data_dir, loop,
            stdout=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        try:
            assert parent.stdout is not None
            pid = await asyncio.wait_for(_read_marker(parent.stdout, "postmaster="), 30)
            backends = psutil.Process(pid).children()
            assert backends
        finally:
            parent.kill()
            await parent.wait()
        await wait_until(lambda: gone(pid), timeout=10, what="the postmaster to die")
        await wait_until(lambda: all(gone(b.pid) for b in backends), what="backends to die")


# A parent that spawns `sleep` with die_with_parent as preexec_fn, prints its pid, waits.
PARENT_SCRIPT = """
import subprocess, sys, time
from manager.embedded.child_process import die_with_parent
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent)
print(f"child={child.pid}", flush=True)
time.sleep(60)
"""

# Prints uid, gid, supplementary groups and the parent-death signal (prctl PR_GET_PDEATHSIG).
SHOW_IDENTITY = (
    "import ctypes, os; sig = ctypes.c_int(); "
    "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0); "
    "print(os.getuid(), os.getgid(), os.getgroups(), sig.value)"
)


class TestChildProcess:
    @linux_only
    async def test_die_with_parent_kills_child_with_parent(self) -> None:
        """A child spawned with die_with_parent as preexec_fn is killed when its parent is."""
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PARENT_SCRIPT, stdout=asyncio.subprocess.PIPE, cwd=REPO
        )
        try:
            assert parent.stdout is not None
            child = await asyncio.wait_for(_read_marker(parent.stdout, "child="), 10)
            assert not gone(child)
        finally:
            parent.kill()
            await parent.wait()
        await wait_until(lambda: gone(child), timeout=5, what="the child to die")

    @linux_only
    def test_parent_already_gone_kills_child_at_once(self) -> None:
        """If the parent died before the call (ppid is not the given pid) the child dies."""
        preexec = functools.partial(die_with_parent, os.getppid())  # not the child's parent
        done = subprocess.run(["true"], preexec_fn=preexec, check=False)
        assert done.returncode == -9

    @as_root
    @linux_only
    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_child_setup_switches_user_then_sets_death_signal(self, loop: str) -> None:
        """child_setup(user) runs the child as user, no extra groups, death signal kept."""
        nobody = OsUser.named("nobody")
        python = Path("/usr/bin/python3")  # a python that nobody may run (ours is under /root)
        if not python.exists():
            pytest.skip("no /usr/bin/python3")

        async def run() -> bytes:
            child = await asyncio.create_subprocess_exec(
                python, "-c", SHOW_IDENTITY,
                stdout=asyncio.subprocess.PIPE, cwd="/", preexec_fn=child_setup(nobody),
            )  # fmt: skip
            out, _ = await child.communicate()
            return out

        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            out = runner.run(run())
        assert out.decode().split(" ", 2) == [str(nobody.uid), str(nobody.gid), "[] 9\n"]

    def test_current_user(self) -> None:
        """OsUser.current() is this process's effective user."""
        me = OsUser.current()
        assert (me.uid, me.gid) == (os.geteuid(), os.getegid())
