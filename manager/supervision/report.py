"""The supervisor's part of the status document: each bot and its instances, as
:class:`~manager.status.BotStatus`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from manager.observe.memory import tree_rss
from manager.status import BotStatus, InstanceStatus, Role
from manager.supervision.instance import Instance

if TYPE_CHECKING:
    from manager.supervision.bot import Bot


def bot_status(bot: Bot, *, now: float, wall: float) -> BotStatus:
    """``bot`` as ``multibot status`` shows it; ``now`` is the monotonic clock, ``wall``
    the wall clock (both read once for the whole document)."""
    config = bot.config
    return BotStatus(
        id=config.id,
        state=bot.state,
        restarts=sum(i.tracker.restarts for i in bot.instances),
        replicas=config.replicas,
        standby=config.standby,
        instances=[
            instance_status(i, standby=config.standby, now=now, wall=wall) for i in bot.instances
        ],
    )


def instance_status(
    instance: Instance, *, standby: bool, now: float, wall: float
) -> InstanceStatus:
    """One slot: its process (if any), state, role, restarts, memory and heartbeat."""
    process = instance.process
    if process is None or process.pid is None:
        return InstanceStatus(
            instance=instance.index,
            pid=process.pid if process else None,
            state=instance.state,
            restarts=instance.tracker.restarts,
            last_exit=instance.last_exit,
        )
    role = None
    if standby:
        role = Role.ACTIVE if process.active_token is not None else Role.STANDBY
    # None until the process's first beat: it has not claimed to be alive yet.
    beat = process.last_heartbeat
    return InstanceStatus(
        instance=instance.index,
        pid=process.pid,
        state=instance.state,
        role=role,
        uptime=wall - process.started_wall,
        restarts=instance.tracker.restarts,
        rss=tree_rss(process.pid, process.user),
        heartbeat_age=now - beat if beat is not None else None,
        last_exit=instance.last_exit,
    )
