"""A click group whose subcommands are imported when they are used.

``multibot --help`` and ``multibot status`` must answer at once, at 3 a.m. as any time; the
daemon, the HTTP API (FastAPI), the benchmarks and the soak take most of a second to
import. So each subcommand is named here by ``"module:attribute"`` with its one-line help,
and its module is imported only when the command runs (or its own ``--help`` is asked
for). ``tests/manager/cli/test_cli_lazy.py`` checks that every one-line help here is the
command's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click

#: A lazy subcommand: where it lives ("package.module:attribute") and its one-line help.
LazyCommand = tuple[str, str]


class LazyGroup(click.Group):
    """A group with ``lazy`` subcommands besides the ones added to it the usual way."""

    def __init__(
        self, *args: Any, lazy: Mapping[str, LazyCommand] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, LazyCommand] = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.add_command(self.load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def load(self, name: str) -> click.Command:
        """Import the lazy command ``name``."""
        module, _, attribute = self.lazy[name][0].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[name][0]} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their one-line help, without importing the lazy ones."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                # Shortened as click shortens a loaded command's help.
                stand_in = click.Command(name, help=self.lazy[name][1])
                rows.append((name, stand_in.get_short_help_str(limit)))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
