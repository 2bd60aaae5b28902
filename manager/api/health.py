"""Health, readiness, metrics and the status page."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from manager.api.context import view_of
from manager.api.errors import ERRORS
from manager.api.models import ApiStatus, Health, HistoryOut, HistorySampleOut, Readiness
from manager.api.security import Watcher

router = APIRouter(tags=["health"])
#: The Prometheus text format's content type.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=Health, summary="The manager process is alive")
async def healthz(request: Request) -> Health:
    """200 while the event loop answers. The archiver's health is in the body (PostgreSQL
    down does not make the manager dead: events wait in Redis)."""
    return view_of(request).health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: problems say why"}},
    summary="Ready to serve: Redis reachable, coordinator running, no bot in a crash loop",
)
async def readyz(request: Request) -> JSONResponse:
    """503 with the problems when not ready. PostgreSQL down is ``degraded``, not unready."""
    problems, checks = await view_of(request).readiness()
    body = Readiness(ready=not problems, problems=problems, checks=checks)
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)


@router.get(
    "/metrics",
    responses={
        200: {"content": {METRICS_TYPE: {}}, "description": "Prometheus text format"},
        **ERRORS,
    },
    response_class=Response,
    summary="Prometheus metrics",
)
async def metrics(request: Request, _: Watcher) -> Response:
    return Response(await view_of(request).metrics(), media_type=METRICS_TYPE)


@router.get(
    "/v1/status",
    response_model=ApiStatus,
    responses=ERRORS,
    summary="What `multibot status --json` shows, for the status page",
)
async def status(request: Request, _: Watcher) -> ApiStatus:
    return await view_of(request).status()


@router.get(
    "/v1/status/history",
    response_model=HistoryOut,
    responses=ERRORS,
    summary="The last quarter of an hour: throughput, dead letters, memory, lag per group",
)
async def history(request: Request, _: Watcher) -> HistoryOut:
    kept = view_of(request).history
    groups = kept.charted_groups()
    return HistoryOut(
        interval=kept.interval,
        window=kept.window,
        groups=groups,
        samples=[
            HistorySampleOut(
                at=s.at, events_per_s=s.events_per_s, dead_letters=s.dead_letters,
                memory_used=s.memory_used, memory_budget=s.memory_budget,
                lag={g: s.lag[g] for g in groups if g in s.lag},
            )
            for s in kept.samples()
        ],
    )  # fmt: skip


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The live status page: one file, no build step, no CDN."""
    return HTMLResponse(files("manager.api").joinpath("static/status.html").read_text())
