"""What a supervised bot process and the manager tell each other.

The manager starts ``python -m bots.runtime`` and writes a :class:`RuntimeSpec` as one JSON
document to its stdin (credentials never travel in argv or the environment); the runtime
reads it back as a :class:`PlainRuntimeSpec` (:func:`read_spec`). The runtime reports back
on an inherited pipe, one line per message (:class:`StatusLine`):

``hb``                       a heartbeat, sent from the bot's event loop
``ready``                    the bot's consumer is reading (or it has no subscriptions)
``standby``                  an active/standby replica waiting for the lease
``active <token>``           this replica took the lease with fencing token ``token``
``+ <stream> <id> …``        handlers started on these entries of a stream
``- <stream> <id> …``        … and ended on them
``m <json>``                 the bus metrics snapshot (:meth:`bus.metrics.BusMetrics.snapshot`,
                             compact JSON without spaces or newlines), cumulative since the
                             process started; sent every ``metrics_interval`` seconds and at
                             a graceful stop, only when it changed

The in-flight lines let the manager know which entries were being handled when a process
died, so an entry that keeps crashing its bot is dead-lettered instead of crash-looping it.
The metrics lines let it add up counters across processes: it keeps each process's last
snapshot, and folds it into its totals when the process exits (manager.observe.fleet_metrics).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from bus.errors import BusError
from bus.plain_settings import PlainBusSettings

if TYPE_CHECKING:
    from bus.runtime_spec import RuntimeSpec

__all__ = [
    "EXIT_CONFIG",
    "EXIT_LEASE_LOST",
    "PlainRuntimeSpec",
    "RuntimeSpec",
    "SpecError",
    "Status",
    "StatusLine",
    "describe",
    "read_spec",
    "spec_json",
]

#: Exit code of a runtime whose lease was lost: it stopped at once to never be a second active.
EXIT_LEASE_LOST = 75
#: Exit code of a runtime given an unusable spec or entry point (restarting will not help).
EXIT_CONFIG = 78


class SpecError(BusError, ValueError):
    """The spec on a runtime's stdin is not one the manager wrote: start bots with multibot."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainRuntimeSpec:
    """A :class:`~bus.runtime_spec.RuntimeSpec` as the runtime reads it (:func:`read_spec`):
    the same fields, trusted, in plain dataclasses, so a bot process loads no pydantic."""

    bot_id: str
    instance: int
    entry: str
    bus: PlainBusSettings
    status_fd: int | None = None
    heartbeat_interval: float = 1.0
    metrics_interval: float = 2.0
    stop_timeout: float = 10.0
    lease_ttl: float | None = None
    log_level: str = "info"
    log_json: bool = True
    manager_pid: int | None = None
    subscriptions: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __repr__(self) -> str:  # the bus settings carry the bot's Redis password
        return f"<PlainRuntimeSpec {self.bot_id}[{self.instance}] entry={self.entry}>"


def read_spec(line: bytes) -> PlainRuntimeSpec:
    """The spec from the JSON line :func:`spec_json` wrote; :class:`SpecError` for anything
    else (not JSON, not an object, a field missing or unknown).

    Values are not checked again: the manager validated them as a :class:`RuntimeSpec`.
    """
    try:
        fields = orjson.loads(line)
        if not isinstance(fields, dict):
            raise TypeError(f"a JSON object expected, got {type(fields).__name__}")
        fields["bus"] = PlainBusSettings.from_json(fields["bus"])
        fields["subscriptions"] = tuple(
            (pattern, where) for pattern, where in fields.get("subscriptions", ())
        )
        return PlainRuntimeSpec(**fields)
    except (ValueError, TypeError, KeyError) as exc:  # orjson's JSONDecodeError is a ValueError
        raise SpecError(f"{type(exc).__name__}: {exc}") from None


class Status(enum.StrEnum):
    """The kinds of status line."""

    #: The event loop of the bot is alive.
    HEARTBEAT = "hb"
    #: The consumer is reading.
    READY = "ready"
    #: Waiting for the lease.
    STANDBY = "standby"
    #: Holding the lease.
    ACTIVE = "active"
    #: Handlers started on entries.
    STARTED = "+"
    #: Handlers ended on entries.
    FINISHED = "-"
    #: The bus metrics snapshot.
    METRICS = "m"
    #: The bot's group is missing on these streams: the manager, which alone may create
    #: groups, creates it at the start id given (the bot's consumer waits for it).
    GROUPS = "groups"


@dataclass(frozen=True, slots=True)
class StatusLine:
    """One parsed status line."""

    kind: Status
    #: The stream of a ``+``/``-`` line; the start id (``$`` or ``0``) of a ``groups`` line.
    stream: str = ""
    #: Entry ids of a ``+``/``-`` line; the stream keys of a ``groups`` line.
    entry_ids: tuple[str, ...] = ()
    token: int | None = None
    #: The metrics snapshot of a ``m`` line.
    data: dict[str, Any] | None = field(default=None, hash=False)

    def encode(self) -> bytes:
        """The line as written on the pipe, newline included."""
        if self.kind is Status.METRICS:
            return b"m " + orjson.dumps(self.data) + b"\n"
        if self.kind in (Status.STARTED, Status.FINISHED):
            return f"{self.kind} {self.stream} {' '.join(self.entry_ids)}\n".encode()
        if self.kind is Status.GROUPS:
            return f"{self.kind} {self.stream} {' '.join(self.entry_ids)}\n".encode()
        if self.kind is Status.ACTIVE:
            return f"{self.kind} {self.token}\n".encode()
        return f"{self.kind}\n".encode()

    @classmethod
    def parse(cls, line: bytes) -> StatusLine | None:
        """A line from the pipe; None for a line that is not a status line (ignored)."""
        if line.startswith(b"m "):
            try:
                data = orjson.loads(line[2:])
            except orjson.JSONDecodeError:
                return None
            return cls(Status.METRICS, data=data) if isinstance(data, dict) else None
        parts = line.decode(errors="replace").split()
        if not parts:
            return None
        try:
            kind = Status(parts[0])
        except ValueError:
            return None
        if kind is Status.METRICS:
            return None  # no snapshot after the "m"
        if kind in (Status.STARTED, Status.FINISHED):
            if len(parts) < 3:
                return None
            return cls(kind, parts[1], tuple(parts[2:]))
        if kind is Status.GROUPS:
            return cls(kind, parts[1], tuple(parts[2:])) if len(parts) > 2 else None
        if kind is Status.ACTIVE:
            return (
                cls(kind, token=int(parts[1])) if len(parts) == 2 and parts[1].isdigit() else None
            )
        return cls(kind)


def spec_json(spec: RuntimeSpec) -> bytes:
    """The spec as the runtime reads it from stdin."""
    return spec.model_dump_json().encode()


def describe(spec: RuntimeSpec) -> dict[str, Any]:
    """Log-safe fields of a spec (no credentials)."""
    return {"bot_id": spec.bot_id, "instance": spec.instance, "entry": spec.entry}


def __getattr__(name: str) -> Any:
    # RuntimeSpec is a pydantic model: loaded for the manager, which builds specs, never for
    # the runtime, which only reads them.
    if name == "RuntimeSpec":
        from bus.runtime_spec import RuntimeSpec  # noqa: PLC0415 - see above

        globals()[name] = RuntimeSpec  # the next lookup is a plain one
        return RuntimeSpec
    raise AttributeError(f"module 'bus.supervision' has no attribute {name!r}")
