"""Run a private PostgreSQL server as a child process.

The manager runs its own PostgreSQL this way when no DSN is configured; the tests use the same
class for private servers. ``data_dir`` holds the cluster (``pgdata/``), the server log and,
with ``unix_socket=True``, the socket. The first start runs initdb; later starts reuse the
cluster. PostgreSQL refuses to run as root, so as root initdb and the server run as another OS
user (see ``PostgresServer``). Works with PostgreSQL 13 and later: the system's, or the 16.x
that the ``pgserver`` wheel carries (``manager.postgres_binaries`` finds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import IO
from urllib.parse import quote

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
import structlog

from manager.child_process import OsUser, child_setup, chown_tree, first_closed_dir
from manager.errors import EmbeddedServiceError
from manager.postgres_binaries import PostgresBinaries, find_postgres
from manager.redis_server import free_port

log = structlog.get_logger(__name__)

#: The superuser initdb creates; the DSN logs in as it.
ROLE = "multibot"
#: The database start() creates if it is missing; the DSN names it.
DATABASE = "multibot"
_READY_POLL = 0.005  # seconds between readiness checks while the server boots
_LOG_TAIL_LINES = 20
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
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


class PostgresServer:
    """A private PostgreSQL server child process with its cluster, log and socket in data_dir.

    The constructor only records options; ``start()`` finds binaries if none were given,
    picks a free port (kept across restarts), runs initdb on first use and spawns
    ``postgres`` itself (not ``pg_ctl``), in its own session, tied to us by
    ``die_with_parent``. It listens on 127.0.0.1 only; with ``unix_socket=True`` on a socket
    in data_dir instead (and also on TCP if a port is given). Without a password any local
    client may connect (trust); with one, logins need it (scram-sha-256). The password is
    fixed when initdb runs: a later start with another one fails. As root, initdb and the
    server run as ``run_as`` or a default (see ``server_user``), which data_dir is chowned to.
    """

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
        self._data_dir = Path(data_dir).absolute()
        self._binaries = binaries
        self._port = port
        self._password = password
        self._run_as = run_as
        self._unix_socket = unix_socket
        self._switch_to: OsUser | None = None
        self._os_user: OsUser | None = None
        self._process: asyncio.subprocess.Process | None = None
        #: The cluster initdb creates; start() reuses it when it is there.
        self.pgdata = self._data_dir / "pgdata"
        #: The output of initdb and the server.
        self.log_path = self._data_dir / "postgres.log"
        if unix_socket and len(os.fsencode(self._data_dir / ".s.PGSQL.65535")) > _SUN_PATH_MAX:
            raise EmbeddedServiceError(
                f"a unix socket in {self._data_dir} would be longer than {_SUN_PATH_MAX} "
                "bytes: use a shorter data_dir"
            )

    @property
    def data_dir(self) -> Path:
        """Directory holding the cluster, the log and the socket."""
        return self._data_dir

    @property
    def binaries(self) -> PostgresBinaries | None:
        """The binaries this server runs; None until ``start()`` finds some if none were given."""
        return self._binaries

    @property
    def os_user(self) -> OsUser | None:
        """The OS user the server runs as; None before the first start."""
        return self._os_user

    @property
    def port(self) -> int | None:
        """TCP port; None before the first start, and always when listening on a socket only."""
        return self._port

    @property
    def socket_path(self) -> Path:
        """The unix socket (used only with ``unix_socket=True``)."""
        return self._data_dir / f".s.PGSQL.{self._port or _SOCKET_PORT}"

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, None when it is not running."""
        return self._process.pid if self._process and self._process.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (started and not yet exited)."""
        return self.pid is not None

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

    # ASYNC109: on expiry start() kills the server and raises with its log; a cancel scope can't.
    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Spawn the server (initdb first if needed); return once it takes logins, else raise."""
        if self.running:
            raise EmbeddedServiceError(f"{self!r} is already running: call restart() instead")
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        if self._binaries is None:
            self._binaries = await asyncio.to_thread(find_postgres)
        binaries = self._binaries
        if not binaries.runnable():
            raise EmbeddedServiceError(
                f"{binaries.bin_dir} holds no runnable postgres and initdb: pass "
                "binaries=find_postgres(), or install PostgreSQL or `pip install pgserver`"
            )
        self._switch_to = server_user(self._run_as)
        self._os_user = self._switch_to or OsUser.current()
        self._prepare_data_dir(binaries)
        if self._port is None and not self._unix_socket:
            self._port = free_port()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        created = not (self.pgdata / "PG_VERSION").exists()
        if created:
            await self._initdb(binaries, started_at + timeout, log_offset)
        self._check_cluster(binaries)
        with self.log_path.open("ab") as logfile:
            self._process = await self._spawn(self._server_args(binaries), logfile)
        try:
            await self._wait_ready(self._process, started_at + timeout, log_offset)
        except BaseException:
            # Fast shutdown rather than SIGKILL: a killed postmaster leaves its shared memory
            # (in /dev/shm and SysV) until the cluster's next start.
            await self.stop(timeout=5.0)
            raise
        log.info(
            "postgres_server.started",
            port=self._port,
            pid=self._process.pid,
            version=binaries.version_str,
            user=str(self._os_user),
            initdb=created,
            startup_ms=round((loop.time() - started_at) * 1000, 1),
        )

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
                    _kill_group(process.pid)
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

    def _server_args(self, binaries: PostgresBinaries) -> list[str | Path]:
        socket_dir = '"' + str(self._data_dir).replace('"', '""') + '"'  # a GUC list item
        settings = {
            "listen_addresses": "" if self._port is None else "127.0.0.1",
            "port": str(self._port or _SOCKET_PORT),
            "unix_socket_directories": socket_dir if self._unix_socket else "",
            "unix_socket_permissions": "0700",
        }
        args: list[str | Path] = [binaries.postgres, "-D", self.pgdata]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    async def _spawn(
        self, args: list[str | Path], logfile: IO[bytes]
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            cwd=self._data_dir,
            start_new_session=True,  # own process group: a Ctrl-C to us does not reach it
            preexec_fn=child_setup(self._switch_to),  # become the user, die with us
        )

    async def _wait_ready(
        self, process: asyncio.subprocess.Process, deadline: float, log_offset: int
    ) -> None:
        loop = asyncio.get_running_loop()
        exited = asyncio.create_task(process.wait())
        try:
            while not exited.done() and loop.time() < deadline:
                # Connect only once postmaster.pid names our process as ready: it then holds
                # the port, so a foreign server that answered on it is not mistaken for ours.
                if self._pid_file_ready(process.pid) and await self._connects(
                    min(1.0, deadline - loop.time())
                ):
                    return
                # Pause between attempts, but wake at once if the process dies.
                await asyncio.wait({exited}, timeout=_READY_POLL)
        finally:
            exited.cancel()
            await asyncio.wait({exited})
        what = (
            f"exited with code {process.returncode} during startup"
            if process.returncode is not None
            else "did not become ready in time"
        )
        raise EmbeddedServiceError(
            f"{self._binaries} {what} (data {self.pgdata}); its log says:\n"
            + self._log_tail(log_offset)
        )

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

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as logfile:
                logfile.seek(offset)
                lines = logfile.read().decode(errors="replace").splitlines()
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"

    # ASYNC109: the timeout is a grace period before SIGKILL, not a cancel scope.
    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Fast-shut the server down, wait up to ``timeout``, then SIGKILL. Idempotent.

        SIGINT is PostgreSQL's fast shutdown: it ends sessions, writes a checkpoint, exits.
        """
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            log.warning("postgres_server.stop_timeout", pid=process.pid, timeout=timeout)
            _kill_group(process.pid)
            await process.wait()
        self._process = None
        log.info(
            "postgres_server.stopped", port=self._port, pid=process.pid, code=process.returncode
        )

    async def kill(self) -> None:
        """SIGKILL the server's process group (a simulated crash) and reap it. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            _kill_group(process.pid)
            log.info("postgres_server.killed", port=self._port, pid=process.pid)
        await process.wait()
        self._process = None

    async def wait(self) -> int:
        """Wait until the running server exits (a crash, or a stop); its exit code."""
        process = self._process
        if process is None:
            raise EmbeddedServiceError(f"{self!r} is not running")
        return await process.wait()

    async def restart(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (as stop/start)
        """Stop the server if it runs, then start it on the same port and cluster."""
        await self.stop(min(timeout, 10.0))
        await self.start(timeout)

    async def __aenter__(self) -> PostgresServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        version = "?" if self._binaries is None else self._binaries.version_str
        where = f"socket={self.socket_path}" if self._unix_socket else f"port={self._port}"
        user = f" user={self._os_user}" if self._os_user is not None else ""
        state = f"pid={self.pid} running" if self.running else "stopped"
        return f"<PostgresServer {version} {where}{user} {state}>"


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the postmaster and its backends)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
