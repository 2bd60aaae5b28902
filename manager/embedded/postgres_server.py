"""Run a private PostgreSQL server as a child process.

The manager runs its own PostgreSQL this way when no DSN is configured; the tests use the same
class for private servers. ``data_dir`` holds the cluster (``pgdata/``), the server log and,
with ``unix_socket=True``, the socket. The first start runs initdb; later starts reuse the
cluster. PostgreSQL refuses to run as root, so as root initdb and the server run as another OS
user (see ``PostgresServer``). Works with PostgreSQL 13 and later: the system's, or the 16.x
that the ``pgserver`` wheel carries (``manager.embedded.postgres_binaries`` finds them).
``EmbeddedServer`` runs the process; this module says how to set up, probe and stop PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from manager.embedded.child_process import OsUser, child_setup, chown_tree, first_closed_dir
from manager.embedded.postgres_binaries import PostgresBinaries, find_postgres
from manager.embedded.server import SUN_PATH_MAX, EmbeddedServer, kill_group
from manager.errors import EmbeddedServiceError

log = structlog.get_logger(__name__)

#: The superuser initdb creates; the DSN logs in as it.
ROLE = "multibot"
#: The database start() creates if it is missing; the DSN names it.
DATABASE = "multibot"
_SOCKET_PORT = 5432  # names the socket (.s.PGSQL.5432) when there is no TCP port


def server_user(run_as: str | None) -> OsUser | None:
    """The OS user to run initdb and postgres as; None: as ourselves (we are not root).

    As root: ``run_as``, else ``postgres`` (the account packages create to own clusters),
    else ``nobody`` (present everywhere, but shared by other daemons: prefer run_as).
    """
    if os.geteuid() != 0:
        if run_as is None or run_as == OsUser.current().name:
            return None
        raise EmbeddedServiceError(
            f"run_as={run_as!r} needs root, and we run as {OsUser.current()}: leave run_as "
            "unset to run PostgreSQL as ourselves"
        )
    for name in [run_as] if run_as is not None else ["postgres", "nobody"]:
        with contextlib.suppress(KeyError):
            user = OsUser.named(name)
            break
    else:
        raise EmbeddedServiceError(
            f"PostgreSQL refuses to run as root and there is no OS user {run_as or 'postgres'}"
            " to run it as: create one (`useradd --system postgres`) or pass run_as="
        )
    if user.uid == 0:
        raise EmbeddedServiceError(f"run_as={run_as!r} is root, which PostgreSQL refuses")
    return user


class PostgresServer(EmbeddedServer[PostgresBinaries]):
    """A private PostgreSQL server child process with its cluster, log and socket in data_dir.

    The constructor only records options; ``start()`` finds binaries if none were given,
    picks a free port (kept across restarts), runs initdb on first use and spawns
    ``postgres`` itself (not ``pg_ctl``), in its own session, tied to us by
    ``die_with_parent``. It listens on 127.0.0.1 only; with ``unix_socket=True`` on a socket
    in data_dir instead (and also on TCP if a port is given). Without a password any local
    client may connect (trust); with one, logins need it (scram-sha-256). The password is
    fixed when initdb runs: a later start with another one fails. As root, initdb and the
    server run as ``run_as`` or a default (see ``server_user``), which data_dir is chowned to.
    The log (``log_path``) holds the output of initdb and the server.
    """

    _event = "postgres_server"
    # As another user, the server may be unable to read our working directory, which
    # initdb and postgres look up.
    _chdir = True

    def __init__(
        self,
        data_dir: Path,
        *,
        binaries: PostgresBinaries | None = None,
        port: int | None = None,
        password: str | None = None,
        run_as: str | None = None,
        unix_socket: bool = False,
    ) -> None:
        super().__init__(
            data_dir, binary=binaries, port=port, unix_socket=unix_socket, log_name="postgres.log"
        )
        self._password = password
        self._run_as = run_as
        self._switch_to: OsUser | None = None
        self._os_user: OsUser | None = None
        self._created = False
        #: The cluster initdb creates; start() reuses it when it is there.
        self.pgdata = self._data_dir / "pgdata"
        if unix_socket and len(os.fsencode(self._data_dir / ".s.PGSQL.65535")) > SUN_PATH_MAX:
            raise EmbeddedServiceError(
                f"a unix socket in {self._data_dir} would be longer than {SUN_PATH_MAX} "
                "bytes: use a shorter data_dir"
            )

    @property
    def binaries(self) -> PostgresBinaries | None:
        """The binaries this server runs; None until ``start()`` finds some if none were given."""
        return self._binary

    @property
    def os_user(self) -> OsUser | None:
        """The OS user the server runs as; None before the first start."""
        return self._os_user

    @property
    def socket_path(self) -> Path:
        """The unix socket (used only with ``unix_socket=True``)."""
        return self._data_dir / f".s.PGSQL.{self._port or _SOCKET_PORT}"

    @property
    def dsn(self) -> str:
        """A postgresql:// URL (asyncpg, libpq) for the ``multibot`` database, password included."""
        auth = ROLE if self._password is None else f"{ROLE}:{quote(self._password, safe='')}"
        if self._unix_socket:
            where = f"host={quote(str(self._data_dir))}&port={self._port or _SOCKET_PORT}"
            return f"postgresql://{auth}@/{DATABASE}?{where}"
        if self._port is None:
            raise EmbeddedServiceError(f"{self!r} has no port yet: start() it first")
        return f"postgresql://{auth}@127.0.0.1:{self._port}/{DATABASE}?sslmode=disable"

    # ASYNC109: as EmbeddedServer.start, of which this only changes the default.
    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Spawn the server (initdb first if needed); return once it takes logins, else raise."""
        await super().start(timeout)

    async def restart(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (as start)
        """Stop the server if it runs (for up to 10 s), then start it on the same port and
        cluster."""
        await super().restart(timeout)

    def _find_binary(self) -> PostgresBinaries:
        return find_postgres()

    async def _prepare(self, binary: PostgresBinaries, deadline: float, log_offset: int) -> None:
        """Check the binaries, settle the OS user, run initdb if there is no cluster yet."""
        if not binary.runnable():
            raise EmbeddedServiceError(
                f"{binary.bin_dir} holds no runnable postgres and initdb: pass "
                "binaries=find_postgres(), or install PostgreSQL or `pip install pgserver`"
            )
        self._switch_to = server_user(self._run_as)
        self._os_user = self._switch_to or OsUser.current()
        self._prepare_data_dir(binary)
        self._pick_port()
        self._created = not (self.pgdata / "PG_VERSION").exists()
        if self._created:
            await self._initdb(binary, deadline, log_offset)
        self._check_cluster(binary)

    def _start_details(self) -> dict[str, object]:
        return {"user": str(self._os_user), "initdb": self._created}

    def _prepare_data_dir(self, binaries: PostgresBinaries) -> None:
        """Create data_dir; as root hand it to the server's user, who must be able to reach it."""
        user = self._switch_to
        missing = [d for d in (self._data_dir, *self._data_dir.parents) if not d.exists()]
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if user is None:
            return
        for parent in missing[1:]:  # the parents we created: let the user through
            parent.chmod(stat.S_IMODE(parent.stat().st_mode) | stat.S_IXOTH)
        os.chown(self._data_dir, user.uid, user.gid)
        self._data_dir.chmod(0o700)
        for path in (self._data_dir, binaries.postgres, binaries.initdb):
            blocked = first_closed_dir(path, user)
            if blocked is not None:
                info = blocked.stat()
                raise EmbeddedServiceError(
                    f"PostgreSQL refuses to run as root, so it runs as OS user {user}, who "
                    f"cannot reach {path}: {blocked} (mode {stat.S_IMODE(info.st_mode):o}, "
                    f"uid {info.st_uid}) is closed to it. `chmod o+x {blocked}`, move the "
                    f"data dir or binaries somewhere {user} can reach (data under /var/lib, "
                    "say), or pass run_as= a user who can"
                )

    async def _initdb(self, binaries: PostgresBinaries, deadline: float, log_offset: int) -> None:
        """Create the cluster in a staging dir and move it to pgdata once initdb succeeded."""
        if self.pgdata.exists():
            raise EmbeddedServiceError(
                f"{self.pgdata} exists but holds no cluster (no PG_VERSION): move it away"
            )
        staging = self._data_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)  # left by an initdb that was killed
        args: list[str | Path] = [binaries.initdb, "-D", staging, "-U", ROLE]
        args += ["--encoding=UTF8", "--locale=C"]
        pwfile = self._data_dir / "initdb.pw"
        if self._password is None:
            args.append("--auth=trust")
        else:
            pwfile.unlink(missing_ok=True)
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if self._switch_to is not None:
                    os.fchown(fd, self._switch_to.uid, self._switch_to.gid)
                os.write(fd, self._password.encode())
            finally:
                os.close(fd)
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        started_at = asyncio.get_running_loop().time()
        try:
            with self.log_path.open("ab") as logfile:
                process = await self._spawn(args, logfile)
            try:
                code: int | None = await asyncio.wait_for(process.wait(), deadline - started_at)
            except TimeoutError:
                code = None
            finally:
                if process.returncode is None:  # timed out, or start() was cancelled
                    kill_group(process.pid)
                    await process.wait()
        finally:
            pwfile.unlink(missing_ok=True)
        if code != 0:
            what = "did not finish in time" if code is None else f"exited with code {code}"
            raise EmbeddedServiceError(
                f"initdb ({binaries}) {what}; its output:\n" + self._log_tail(log_offset)
            )
        staging.rename(self.pgdata)
        elapsed = asyncio.get_running_loop().time() - started_at
        log.info("postgres_server.initdb", pgdata=str(self.pgdata), ms=round(elapsed * 1000))

    def _check_cluster(self, binaries: PostgresBinaries) -> None:
        """Refuse a cluster of another major version; own it; write our pg_hba.conf."""
        major = (self.pgdata / "PG_VERSION").read_text().strip()
        if major != str(binaries.version[0]):
            raise EmbeddedServiceError(
                f"{self.pgdata} holds a PostgreSQL {major} cluster, but the binaries are "
                f"{binaries}: run PostgreSQL {major} binaries (binaries=), upgrade the "
                "cluster with pg_upgrade, or remove it to start afresh"
            )
        method = "trust" if self._password is None else "scram-sha-256"
        hba = self.pgdata / "pg_hba.conf"
        hba.write_text(  # rewritten at each start, so it follows the password option
            "# Written by multibot's PostgresServer at each start: edits are lost.\n"
            f"local all all {method}\nhost all all 127.0.0.1/32 {method}\n"
        )
        hba.chmod(0o600)
        user = self._switch_to
        if user is not None and self.pgdata.stat().st_uid != user.uid:
            chown_tree(self.pgdata, user)  # a copied cluster, or one run as another user
        elif user is not None:
            os.chown(hba, user.uid, user.gid)

    def _command(self, binary: PostgresBinaries) -> list[str | Path]:
        socket_dir = '"' + str(self._data_dir).replace('"', '""') + '"'  # a GUC list item
        settings = {
            "listen_addresses": "" if self._port is None else "127.0.0.1",
            "port": str(self._port or _SOCKET_PORT),
            "unix_socket_directories": socket_dir if self._unix_socket else "",
            "unix_socket_permissions": "0700",
        }
        args: list[str | Path] = [binary.postgres, "-D", self.pgdata]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def _child_setup(self) -> Callable[[], None]:
        return child_setup(self._switch_to)  # become the user, die with us

    def _files(self) -> str:
        return f"data {self.pgdata}"

    async def _ready(self, pid: int, time_left: float) -> bool:
        # Connect only once postmaster.pid names our process as ready: it then holds the
        # port, so a foreign server that answered on it is not mistaken for ours.
        return self._pid_file_ready(pid) and await self._connects(min(1.0, time_left))

    def _pid_file_ready(self, pid: int) -> bool:
        """Whether postmaster.pid (line 1: pid, line 8: status) says ``pid`` is ready."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"

    async def _connects(self, io_timeout: float) -> bool:
        """Whether a login succeeds; creates the database on the way if it is missing."""
        try:
            conn = await asyncpg.connect(
                host=str(self._data_dir) if self._unix_socket else "127.0.0.1",
                port=self._port or _SOCKET_PORT,
                user=ROLE,
                password=self._password,
                database="postgres",
                ssl=False,
                timeout=io_timeout,
            )
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise EmbeddedServiceError(
                f"{self!r} refused our login ({exc}): a cluster keeps the password it was "
                f"created with; pass that one, or remove {self.pgdata} to start afresh"
            ) from exc
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False  # not listening yet, still starting up or recovering
        try:
            # $1: database name; returns 1 if it exists, else None.
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
                log.info("postgres_server.database_created", database=DATABASE)
        except asyncpg.PostgresError as exc:
            raise EmbeddedServiceError(f"cannot create database {DATABASE}: {exc}") from exc
        finally:
            await conn.close(timeout=io_timeout)
        return True

    async def _request_stop(self, process: asyncio.subprocess.Process, grace: float) -> None:
        """Send SIGINT, PostgreSQL's fast shutdown: it ends sessions, writes a checkpoint, exits."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)

    async def _abandon_start(self) -> None:
        # Fast shutdown rather than SIGKILL: a killed postmaster leaves its shared memory
        # (in /dev/shm and SysV) until the cluster's next start.
        await self.stop(timeout=5.0)

    def _repr_details(self) -> str:
        return f" user={self._os_user}" if self._os_user is not None else ""
