"""The deliveries of one event as a table, for ``events show`` and ``events trace``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from bus.archive.deliveries import GroupTrail

_HEADER = ("GROUP", "STATUS", "CONSUMER", "ATTEMPTS", "READ", "DONE", "HANDLER", "NOTE")


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def trail_rows(trails: Sequence[GroupTrail]) -> list[tuple[str, ...]]:
    """The table's rows (without its header): per group its outcomes, its dead letters,
    or one ``expected, not handled`` line."""
    rows: list[tuple[str, ...]] = []
    for trail in trails:
        for o in trail.outcomes:
            notes = []
            if o.previous:
                notes.append(f"taken over from {o.previous}")
            if o.retry:
                notes.append("DLQ retry")
            rows.append((
                trail.group, o.outcome, o.consumer, str(o.attempts), _time(o.read_at),
                _time(o.done_at), f"{o.handler_ms:.1f} ms", "; ".join(notes),
            ))  # fmt: skip
        for letter in trail.dead_letters:
            note = f"DLQ {letter['dlq_id']}: {letter['reason']}"
            failed = letter["failed_at"]
            rows.append((
                trail.group, "dead-letter", letter["consumer"] or "-", str(letter["attempts"]),
                "-", _time(datetime.fromisoformat(failed)) if failed else "-", "-", note,
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
