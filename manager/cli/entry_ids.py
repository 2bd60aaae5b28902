"""Stream entry ids typed on the command line."""

from __future__ import annotations

from typing import Any

import click

from bus.entry_id import EntryId


def check_entry_id(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Click callback: every value is a full stream entry id (``1700000000000-0``)."""
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if item is None:
            continue
        try:
            EntryId.parse(item, require_seq=True)
        except ValueError:
            raise click.BadParameter(
                f"{item!r} is not an entry id: use the full <milliseconds>-<sequence> form "
                "shown by `multibot dlq list`, like 1700000000000-0"
            ) from None
    return value
