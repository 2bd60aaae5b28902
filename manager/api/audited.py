"""Each write through the HTTP API, recorded in the audit log with its token's name and
its outcome (see :mod:`manager.audit`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException, Request

from bus.archive.audit_log import Outcome
from manager.api.auth import Caller
from manager.api.context import ManagerView, view_of
from manager.audit import record


@contextlib.asynccontextmanager
async def audited(
    request: Request,
    caller: Caller,
    action: str,
    target: str | None = None,
    *,
    buffered: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """Record ``action`` once the block ended: ``ok``, ``refused`` (an HTTP error the
    block raised, with its text) or ``failed``; the block may fill the yielded details.
    ``buffered`` (the publishes): written with others a moment later (see AuditBuffer)."""
    async with audited_on(view_of(request), caller, action, target, buffered=buffered) as detail:
        yield detail


@contextlib.asynccontextmanager
async def audited_on(
    view: ManagerView,
    caller: Caller,
    action: str,
    target: str | None = None,
    *,
    buffered: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """:func:`audited` for the manager ``view`` (a route served without a Request)."""
    detail: dict[str, Any] = {}
    outcome: Outcome = "ok"
    error: str | None = None
    try:
        yield detail
    except HTTPException as exc:
        outcome, error = "refused", _text(exc.detail)
        raise
    except Exception as exc:
        outcome, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        fields: dict[str, Any] = {
            "actor": f"token:{caller.name}", "channel": "api", "action": action,
            "target": target, "detail": detail, "outcome": outcome, "error": error,
        }  # fmt: skip
        if buffered:
            view.audit_buffer.add(**fields)
        else:
            await record(view.bus.redis, view.bus.keys, **fields)


def _text(detail: Any) -> str:
    if isinstance(detail, dict):
        return str(detail.get("error", detail))
    return str(detail)
