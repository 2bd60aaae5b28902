"""Operator actions on their way to ``audit_log`` (see :mod:`bus.archive.audit_log`).

Whoever takes an action (the API, the control socket, the CLI) appends one record to the
stream ``<ns>:audit`` (admin only: no bot's Redis user reaches it) with :func:`record`;
the coordinating manager's :class:`AuditCopier` moves the records into PostgreSQL in
batches, acking and deleting each only after its commit. So PostgreSQL being away delays
the log and loses nothing; a record Redis refuses (down, read-only, out of memory) goes to
the manager's log at error level with every field, so the journal keeps it.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import pwd
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.archive.audit_log import AuditRecord, Outcome
from bus.archive.errors import ArchiveDataError
from bus.archive.store import ArchiveStore
from bus.keys import Keys
from manager.stream_copier import StreamCopier

log = structlog.get_logger("manager.audit")

#: The copier's group and consumer on the audit stream.
AUDIT_GROUP = "audit-copier"
#: Records the stream keeps at most (about): a PostgreSQL outage of many days of actions.
MAX_WAITING = 100_000
_BATCH = 500
_FIELDS = ("id", "at", "actor", "channel", "action", "target", "detail", "outcome", "error")


def audit_key(keys: Keys) -> str:
    """The stream of records not yet copied into PostgreSQL."""
    return f"{keys.namespace}:audit"


def os_actor(uid: int | None = None) -> str:
    """``user:<name>`` of ``uid`` (default: this process's user), ``user:<uid>`` unnamed."""
    uid = os.getuid() if uid is None else uid
    try:
        return f"user:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"user:{getpass.getuser() if uid == os.getuid() else uid}"


async def record(
    redis: Redis,
    keys: Keys,
    *,
    actor: str,
    channel: str,
    action: str,
    target: str | None = None,
    detail: Mapping[str, Any] | None = None,
    outcome: Outcome = "ok",
    error: str | None = None,
) -> None:
    """Append one action to the audit stream; never raises (see the module)."""
    entry = AuditRecord(
        at=datetime.now(UTC), actor=actor, channel=channel, action=action, target=target,
        detail=dict(detail or {}), outcome=outcome, error=error,
    )  # fmt: skip
    fields: dict[Any, Any] = _encode(entry)
    try:
        await redis.xadd(audit_key(keys), fields, maxlen=MAX_WAITING, approximate=True)
    except (RedisError, OSError) as exc:
        log.error("audit record not kept in Redis: it is only in this log",
                  redis_error=str(exc), **entry.as_json())  # fmt: skip


class AuditBuffer:
    """Records of the API's publishes, written together every ``interval`` seconds: one
    stream entry per flush (``batch``: a JSON array of records) instead of one command
    per request, which cost the publish path a third of its throughput. A manager killed
    meanwhile loses at most ``interval`` of them; the events themselves carry ``source =
    api:<token>`` into the archive."""

    def __init__(self, redis: Redis, keys: Keys, interval: float = 0.2) -> None:
        self._redis = redis
        self._key = audit_key(keys)
        self._interval = interval
        self._waiting: list[dict[str, str]] = []

    def __repr__(self) -> str:
        return f"<AuditBuffer {len(self._waiting)} waiting>"

    def add(self, **fields: Any) -> None:
        """Queue one record (``record``'s keyword arguments but the client and keys)."""
        detail = fields.pop("detail", None)
        entry = AuditRecord(at=datetime.now(UTC), detail=dict(detail or {}), **fields)
        self._waiting.append(_encode(entry))

    async def run(self) -> None:
        """Flush every ``interval`` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                await self.flush()
        finally:
            await self.flush()

    async def flush(self) -> None:
        """Write what waits as one entry; never raises (see :func:`record`)."""
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        fields: dict[Any, Any] = {"batch": orjson.dumps(batch)}
        try:
            await self._redis.xadd(self._key, fields, maxlen=MAX_WAITING, approximate=True)
        except (RedisError, OSError) as exc:
            for one in batch:
                log.error("audit record not kept in Redis: it is only in this log",
                          redis_error=str(exc), **one)  # fmt: skip


def _encode(entry: AuditRecord) -> dict[str, str]:
    values = entry.as_json()
    values["detail"] = orjson.dumps(entry.detail).decode()
    return {k: "" if values[k] is None else str(values[k]) for k in _FIELDS}


def decode(fields: Mapping[Any, Any]) -> AuditRecord:
    """A record from its stream entry; ValueError (or KeyError) for one not ours."""
    text = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in fields.items()
    }
    outcome = text["outcome"]
    if outcome not in ("ok", "refused", "failed"):
        raise ValueError(f"unknown outcome {outcome!r}")
    if any("\x00" in v for v in text.values()) or "\\u0000" in text.get("detail", ""):
        raise ValueError("a NUL character, which PostgreSQL text cannot hold")
    detail = orjson.loads(text.get("detail") or "{}")
    if not isinstance(detail, dict):
        raise ValueError("detail is not an object")
    return AuditRecord(
        id=str(uuid.UUID(text["id"])),
        at=datetime.fromisoformat(text["at"]),
        actor=text["actor"],
        channel=text["channel"],
        action=text["action"],
        target=text.get("target") or None,
        detail=detail,
        outcome=outcome,  # type: ignore[arg-type]  # checked above
        error=text.get("error") or None,
    )


def _items(fields: Mapping[Any, Any]) -> list[Any]:
    """The records of one stream entry: itself, or those of its ``batch`` array (an
    unreadable batch is one bad item, dropped as such)."""
    batch = fields.get("batch", fields.get(b"batch"))
    if batch is None:
        return [fields]
    try:
        items = orjson.loads(batch)
    except orjson.JSONDecodeError:
        return [{}]
    return items if isinstance(items, list) else [{}]


class AuditCopier(StreamCopier[AuditRecord]):
    """Moves the audit stream into ``audit_log``; :meth:`run` until cancelled."""

    what = "audit records"

    def __init__(
        self, redis: Redis, keys: Keys, store: Callable[[], Awaitable[ArchiveStore]]
    ) -> None:
        super().__init__(redis, audit_key(keys), AUDIT_GROUP, store, batch=_BATCH)

    def decode(self, entry_id: str, fields: Mapping[Any, Any]) -> list[AuditRecord]:
        """The entry's records; a bad one among them is dropped alone, with a log line."""
        records = []
        for item in _items(fields):
            try:
                records.append(decode(item))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.dropped += 1
                log.error("audit stream entry is not a record: dropped",
                          entry_id=entry_id, error=str(exc))  # fmt: skip
        return records

    async def store(self, store: ArchiveStore, records: Sequence[AuditRecord]) -> None:
        """All at once; if PostgreSQL refuses the data, one by one, logging (in full) and
        dropping only what it refuses, so one bad record cannot hold the log up."""
        try:
            self.copied += await store.audit.insert(records)
            return
        except ArchiveDataError:
            pass
        for one in records:
            try:
                self.copied += await store.audit.insert([one])
            except ArchiveDataError as exc:
                self.dropped += 1
                log.error("PostgreSQL refused an audit record: it is only in this log",
                          postgres_error=str(exc), **one.as_json())  # fmt: skip
