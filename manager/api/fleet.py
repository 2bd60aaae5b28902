"""``/v1/streams``, ``/v1/groups``, ``/v1/bots``: what the fleet and its streams are doing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from redis.exceptions import ResponseError

from manager.api.audited import audited
from manager.api.context import ManagerView, view_of
from manager.api.errors import ERRORS
from manager.api.models import ConsumerOut, GroupOut, Restarted, StreamOut
from manager.api.security import Admin, Reader
from manager.observe.lag import group_lags, stream_keys
from manager.status import BotStatus

router = APIRouter(tags=["fleet"])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _streams(view: ManagerView) -> list[str]:
    bus = view.bus
    return [*await stream_keys(bus.redis, bus.keys), bus.keys.dead_letters()]


def _name(view: ManagerView, key: str) -> str:
    keys = view.bus.keys
    return "dead-letters" if key == keys.dead_letters() else keys.stream_name(key)


@router.get(
    "/v1/streams",
    response_model=list[StreamOut],
    responses=ERRORS,
    summary="Every stream of the namespace: length, first and last id, memory",
)
async def streams(request: Request, _: Reader) -> list[StreamOut]:
    view = view_of(request)
    redis = view.bus.redis
    out = []
    for key in await _streams(view):
        try:
            info: Any = await redis.xinfo_stream(key)
        except ResponseError:
            continue  # gone since the scan (the DLQ may not exist yet)
        info = {_text(k): v for k, v in info.items()}
        first = info.get("first-entry")
        last = info.get("last-entry")
        memory: Any = await redis.memory_usage(key, samples=5)
        out.append(
            StreamOut(
                stream=_name(view, key),
                key=key,
                length=int(info["length"]),
                first_entry_id=_text(first[0]) if first else None,
                last_entry_id=_text(last[0]) if last else None,
                memory_bytes=None if memory is None else int(memory),
            )
        )
    return out


@router.get(
    "/v1/groups",
    response_model=list[GroupOut],
    responses=ERRORS,
    summary="Every consumer group: lag, pending, consumers and their idle time",
)
async def groups(request: Request, _: Reader) -> list[GroupOut]:
    view = view_of(request)
    redis = view.bus.redis
    out = []
    for lag in await group_lags(redis, await _streams(view), keys=view.bus.keys):
        try:
            key = view.bus.keys.group_key(lag.stream, lag.group)
            raw: Any = await redis.xinfo_consumers(key, lag.group)
        except ResponseError:
            raw = []  # the group went away since
        consumers = [
            ConsumerOut(
                name=_text(c["name"]),
                pending=int(c["pending"]),
                idle_seconds=int(c["idle"]) / 1000,
            )
            for c in ({_text(k): v for k, v in c.items()} for c in raw)
        ]
        out.append(
            GroupOut(
                stream=_name(view, lag.stream),
                group=lag.group,
                lag=lag.lag,
                pending=lag.pending,
                last_delivered_id=lag.last_delivered_id,
                consumers=consumers,
            )
        )
    return out


@router.get(
    "/v1/bots",
    response_model=list[BotStatus],
    responses=ERRORS,
    summary="Every bot and its instances: state, pid, restarts, RSS, heartbeat",
)
async def bots(request: Request, _: Reader) -> list[BotStatus]:
    return view_of(request).bots()


@router.post(
    "/v1/bots/{bot_id}/restart",
    status_code=202,
    response_model=Restarted,
    responses=ERRORS,
    summary="Restart every instance of a bot (a failed one too)",
)
async def restart(request: Request, caller: Admin, bot_id: str) -> Restarted:
    async with audited(request, caller, "restart", bot_id):
        await view_of(request).restart_bot(bot_id)
    return Restarted(bot=bot_id)
