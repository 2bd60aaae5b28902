"""``/v1/dlq``: list, retry and delete dead letters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import AfterValidator

from bus.entry_id import EntryId
from bus.errors import DeadLetterNotFoundError, DeadLetterRetryError
from manager.api.audited import audited
from manager.api.context import view_of
from manager.api.errors import ERRORS
from manager.api.models import DeadLetterOut, DeadLetterPage, Deleted, Retried
from manager.api.security import Admin, Reader

router = APIRouter(tags=["dead letters"])
_ENTRY_ID = r"^\d{1,20}-\d{1,20}$"


def _fits_redis(entry_id: str | None) -> str | None:
    """Stream ids are two unsigned 64-bit numbers; Redis refuses larger ones."""
    if entry_id is not None:
        EntryId.parse(entry_id, require_seq=True)  # ValueError saying why
    return entry_id


DlqId = Annotated[
    str,
    Path(pattern=_ENTRY_ID, description="a dead letter's id, like 1700000000000-0"),
    AfterValidator(_fits_redis),
]


@router.get(
    "/v1/dlq", response_model=DeadLetterPage, responses=ERRORS, summary="Dead letters, oldest first"
)
async def list_dead_letters(
    request: Request,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        str | None,
        Query(pattern=_ENTRY_ID, description="next_after of the previous page"),
        AfterValidator(_fits_redis),
    ] = None,
) -> DeadLetterPage:
    letters = await view_of(request).bus.dlq.list(count=limit, after=after or "-")
    page = [DeadLetterOut(**letter.to_json()) for letter in letters]
    return DeadLetterPage(dead_letters=page, next_after=page[-1].id if len(page) == limit else None)


@router.post(
    "/v1/dlq/{dlq_id}/retry",
    response_model=Retried,
    responses=ERRORS,
    summary="Re-deliver a dead letter to the group that failed it",
)
async def retry(request: Request, caller: Admin, dlq_id: DlqId) -> Retried:
    async with audited(request, caller, "dlq.retry", dlq_id) as detail:
        try:
            entry_id = await view_of(request).bus.dlq.retry(dlq_id)
        except DeadLetterNotFoundError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except DeadLetterRetryError as exc:
            raise HTTPException(409, str(exc)) from None
        detail["entry_id"] = entry_id
    return Retried(id=dlq_id, entry_id=entry_id)


@router.delete(
    "/v1/dlq/{dlq_id}",
    response_model=Deleted,
    responses=ERRORS,
    summary="Delete a dead letter for good",
)
async def delete(request: Request, caller: Admin, dlq_id: DlqId) -> Deleted:
    async with audited(request, caller, "dlq.delete", dlq_id):
        deleted = await view_of(request).bus.dlq.purge([dlq_id])
        if not deleted:
            raise HTTPException(404, f"dead letter {dlq_id} not found: it was retried or deleted")
    return Deleted(deleted=deleted)
