"""How a ``multibot`` command reaches Redis: the options, finding the manager's Redis, and
running a coroutine with Redis failures as one-line errors."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import uvloop
from click.core import ParameterSource
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.connection import connect, redact
from bus.errors import BusConnectionError
from bus.settings import BusSettings
from bus.tls import REDIS_TLS, tls_problem

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_REDIS_URL: str = BusSettings.model_fields["redis_url"].default
DEFAULT_NAMESPACE: str = BusSettings.model_fields["namespace"].default
CLIENT_NAME = "multibot-cli"


def bus_options(fn: F) -> F:
    """Add ``--redis-url`` and ``--namespace`` (and their environment variables) to a command."""
    fn = click.option(
        "--namespace",
        envvar="MULTIBOT_NAMESPACE",
        default=DEFAULT_NAMESPACE,
        show_default=True,
        show_envvar=True,
        help="Key prefix of the deployment (several deployments can share one Redis). "
        "Without it, the namespace of the manager or config the Redis was found from.",
    )(fn)
    return click.option(
        "--redis-url",
        envvar="MULTIBOT_REDIS_URL",
        default=None,
        show_envvar=True,
        metavar="URL",
        help="Redis of the bus: redis://[:password@]host:port/db, rediss:// (TLS) or unix://. "
        "[default: the Redis of the manager running with this machine's config "
        "(MULTIBOT_CONFIG, else the checkout's), asked through its control socket; else the "
        "config's redis_url; else the command refuses to run]",
    )(fn)


@dataclass(frozen=True)
class FoundRedis:
    """The Redis a command uses when no URL was given, and where it was found."""

    url: str
    namespace: str
    #: Where it came from, for the one line on stderr (``the manager running on …``).
    origin: str


def find_redis(environ: Mapping[str, str]) -> FoundRedis:
    """The Redis of the manager running with this machine's config, else the config's.

    The config is ``MULTIBOT_CONFIG`` or the checkout's default; the manager answers on its
    control socket, which only its user (or root) may open. With neither a running manager
    nor a ``redis_url`` in the config there is no Redis this machine's deployment uses:
    that is a usage error saying what to do, never a guess at ``127.0.0.1:6379``, which
    may be some other program's Redis.
    """
    from manager.config import ConfigError, config_path, load_config  # noqa: PLC0415
    from manager.control_client import ControlError, call, control_path  # noqa: PLC0415

    path = config_path(None, environ)
    todo = (
        "start the manager (`multibot start`), point MULTIBOT_CONFIG at the config of the one "
        "that runs, or pass --redis-url (or MULTIBOT_REDIS_URL)"
    )
    try:
        settings = load_config(path)
    except ConfigError as exc:
        raise click.UsageError(f"no Redis to use: {exc}\nOr {todo}.") from None
    where = f"config {path} (data dir {settings.data_dir})"
    why = f"no manager is running for {where}"
    socket_path = control_path(settings.data_dir)
    if _listening(socket_path):  # else no manager runs there (or a killed one left the file)
        try:
            found = uvloop.run(call(socket_path, "connection", timeout=5.0))
        except ControlError as exc:
            why = f"the manager for {where} did not say where its Redis is ({exc})"
        else:
            url = found.get("redis_url") if isinstance(found, dict) else None
            if isinstance(url, str):
                namespace = found.get("namespace")
                return FoundRedis(
                    url=url,
                    namespace=namespace if isinstance(namespace, str) else settings.namespace,
                    origin=f"the manager running on {settings.data_dir}",
                )
    if settings.redis_url is not None:
        return FoundRedis(settings.redis_url, settings.namespace, f"redis_url of {path}")
    raise click.UsageError(f"no Redis to use: {why}, and that config sets no redis_url: {todo}.")


def _listening(path: Path) -> bool:
    """Whether something listens on the unix socket ``path``: a killed manager leaves its
    socket file behind, refusing connections."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # there but not ours to open (permission): asking it says so
    return True


def bus_settings(redis_url: str | None, namespace: str) -> BusSettings:
    """Settings from the common options; a bad value is a usage error naming the option.

    Without a URL: the running manager's Redis, else the config's (:func:`find_redis`),
    named on stderr so the command's output stays clean; the namespace comes with it
    unless one was given.
    """
    if not redis_url:
        found = find_redis(os.environ)
        redis_url = found.url
        ctx = click.get_current_context(silent=True)
        given = ctx is not None and ctx.get_parameter_source("namespace") not in (
            None,
            ParameterSource.DEFAULT,
            ParameterSource.DEFAULT_MAP,
        )
        namespace = namespace if given else found.namespace
        click.echo(f"Redis: {redact(redis_url)}, namespace {namespace} ({found.origin})", err=True)
    try:
        return BusSettings(redis_url=redis_url, namespace=namespace)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "redis_url"
        # The message only: pydantic's full text would echo the URL and its password.
        message = err["msg"].removeprefix("Value error, ")
        raise click.BadParameter(message, param_hint=f"'--{field.replace('_', '-')}'") from None


@asynccontextmanager
async def open_redis(settings: BusSettings) -> AsyncIterator[Redis]:
    """A Redis client of the bus (bounded retries), closed on exit."""
    redis = connect(settings, client_name=CLIENT_NAME)
    try:
        yield redis
    finally:
        await redis.aclose()


def run(settings: BusSettings, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop; Redis failures become one-line errors (exit 1), no traceback."""
    url = redact(settings.redis_url)
    try:
        return uvloop.run(coro)
    except AuthenticationError as exc:
        raise click.ClickException(
            f"Redis at {url} refused the credentials ({exc}): put the right password in "
            "--redis-url or MULTIBOT_REDIS_URL (redis://:PASSWORD@host:port/db)."
        ) from None
    except (BusConnectionError, RedisConnectionError, RedisTimeoutError) as exc:
        if problem := tls_problem(exc, settings.redis_url, REDIS_TLS):
            raise click.ClickException(problem) from None
        cause = exc.__cause__ if isinstance(exc, BusConnectionError) and exc.__cause__ else exc
        raise click.ClickException(
            f"cannot reach Redis at {url} ({cause}). Start Redis there, or point "
            "--redis-url (or MULTIBOT_REDIS_URL) at a running server."
        ) from None
    except RedisError as exc:
        raise click.ClickException(f"Redis at {url} answered with an error: {exc}") from None
