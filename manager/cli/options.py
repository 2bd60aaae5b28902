"""Click options that several commands share: the Redis to run on, counts, seconds, rates
and ``--json``.

Each function returns one ``click.option`` decorator with the type and the defaults its
kind of option always has; the command adds its own default and help text. The commands
are imported lazily (:mod:`manager.cli.lazy`), so this module imports click only: loading
it must not make ``multibot --help`` slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

#: What a click option decorates: a function, or a command it has already made.
FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)


def redis_url_option(**attrs: Any) -> Callable[[FC], FC]:
    """``--redis-url``, also read from ``MULTIBOT_REDIS_URL``; ``None`` when neither is set."""
    return click.option("--redis-url", envvar="MULTIBOT_REDIS_URL", default=None, **attrs)


def count_option(
    *decls: str,
    default: int | Sequence[int] | None,
    minimum: int = 1,
    maximum: int | None = None,
    **attrs: Any,
) -> Callable[[FC], FC]:
    """A whole number from ``minimum`` (up to ``maximum``), its default shown in the help."""
    type_ = click.IntRange(minimum, maximum)
    return click.option(*decls, type=type_, default=default, **{"show_default": True, **attrs})


def seconds_option(
    *decls: str,
    default: float | None,
    minimum: float = 0,
    min_open: bool = False,
    **attrs: Any,
) -> Callable[[FC], FC]:
    """A time in seconds from ``minimum`` (excluded with ``min_open``), its default shown
    in the help unless ``show_default=False``."""
    type_ = click.FloatRange(minimum, min_open=min_open)
    return click.option(*decls, type=type_, default=default, **{"show_default": True, **attrs})


def rate_option(
    *, default: float, minimum: float, maximum: float | None = None, **attrs: Any
) -> Callable[[FC], FC]:
    """``--rate``: how many a second, from ``minimum`` (up to ``maximum``), its default shown."""
    type_ = click.FloatRange(minimum, maximum)
    return click.option("--rate", type=type_, default=default, show_default=True, **attrs)


def json_flag(help_text: str) -> Callable[[FC], FC]:
    """``--json``, passed to the command as ``as_json``; ``help_text`` says what it prints."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)
