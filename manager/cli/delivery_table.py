"""The deliveries of one event as a table, for ``events show`` and ``events trace``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bus.archive.deliveries import GroupTrail

_HEADER = ("GROUP", "STATUS", "CONSUMER", "DELIVERY", "READ", "DONE", "HANDLER", "NOTE")


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def _letter_note(letter: Mapping[str, Any]) -> str:
    tries = letter["attempts"]
    after = f" after {tries} attempt{'s' if tries != 1 else ''}" if tries else ""
    return f"DLQ {letter['dlq_id']}: {letter['reason']}{after}"


def trail_rows(trails: Sequence[GroupTrail]) -> list[tuple[str, ...]]:
    """The table's rows (without its header): per group its outcomes (a dead-lettered one
    with its dead letter's id), dead letters with no outcome recorded (poison entries),
    or one ``expected, not handled`` line. DELIVERY is Redis's delivery count (#2: the
    second time the group was handed the entry)."""
    rows: list[tuple[str, ...]] = []
    for trail in trails:
        letters = list(trail.dead_letters)
        for o in trail.outcomes:
            notes = []
            if o.outcome == "dead_lettered":
                mine = next((x for x in letters if x["consumer"] == o.consumer), None)
                if mine is not None:
                    letters.remove(mine)
                    notes.append(_letter_note(mine))
            if o.previous:
                notes.append(f"taken over from {o.previous}")
            if o.retry:
                notes.append("sent again by a DLQ retry")
            rows.append((
                trail.group, o.outcome, o.consumer, f"#{o.attempts}", _time(o.read_at),
                _time(o.done_at), f"{o.handler_ms:.1f} ms", "; ".join(notes),
            ))  # fmt: skip
        for letter in letters:
            failed = letter["failed_at"]
            rows.append((
                trail.group, "dead_lettered", letter["consumer"] or "-", "-", "-",
                _time(datetime.fromisoformat(failed)) if failed else "-", "-",
                _letter_note(letter),
            ))  # fmt: skip
        if not trail.outcomes and not trail.dead_letters:
            rows.append((trail.group, "expected, not handled", *("-",) * 5, ""))
    return rows


def table(trails: Sequence[GroupTrail], indent: str = "") -> list[str]:
    """The deliveries of one event as aligned lines (``no deliveries`` when none)."""
    rows = trail_rows(trails)
    if not rows:
        return [f"{indent}no deliveries recorded and no group expected it"]
    widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
    return [
        indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [_HEADER, *rows]
    ]
