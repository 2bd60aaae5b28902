"""What commands print: JSON, tables, shortened text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
import orjson


def echo_json(obj: Any, *, compact: bool = False) -> None:
    """Print ``obj`` as JSON: indented, or on one line (for JSON-lines streams)."""
    option = orjson.OPT_NON_STR_KEYS | (0 if compact else orjson.OPT_INDENT_2)
    click.echo(orjson.dumps(obj, option=option, default=str).decode())


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows as left-aligned columns under upper-case headers."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in [[h.upper() for h in headers], *rows]:
        cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
