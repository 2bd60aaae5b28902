"""``GET /v1/audit``: the operator actions the audit log holds (admin scope)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from bus.archive.audit_log import AuditRecord
from manager.api.errors import ERRORS
from manager.api.events import archive_of, check_text, moment_param
from manager.api.models import AuditEntryOut, AuditPage
from manager.api.security import Admin

router = APIRouter(tags=["audit"])
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _cursor(value: str) -> tuple[datetime, str]:
    at, _, record_id = value.rpartition("|")
    try:
        return datetime.fromisoformat(at), str(uuid.UUID(record_id))
    except ValueError:
        raise HTTPException(
            422, f"after={value!r} is not a cursor: pass next_after of the previous page"
        ) from None


@router.get(
    "/v1/audit",
    response_model=AuditPage,
    responses=ERRORS,
    summary="Operator actions, oldest first: who did what, when, and how it ended",
)
async def audit(
    request: Request,
    _: Admin,
    *,
    since: Annotated[str | None, Query(description="a time or a duration back (24h)")] = None,
    actor: Annotated[str | None, Query(description="token:NAME or user:NAME")] = None,
    action: Annotated[str | None, Query(description="actions starting so (dlq.)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="next_after of the previous page")] = None,
) -> AuditPage:
    for name, value in (("actor", actor), ("action", action), ("after", after)):
        if value is not None:
            check_text(value, name)
    start = moment_param(since, "since") or _EPOCH
    cursor = _cursor(after) if after else None
    store = await archive_of(request)
    found = await store.audit.list(start, after=cursor, actor=actor, action=action, limit=limit)
    page = [AuditEntryOut(**_json(entry)) for entry in found]
    last = found[-1] if len(found) == limit else None
    return AuditPage(actions=page, next_after=f"{last.at.isoformat()}|{last.id}" if last else None)


def _json(entry: AuditRecord) -> dict[str, object]:
    values = entry.as_json()
    values["at"] = entry.at
    return values
