"""A configured bot as the supervisor runs it: its slots, their tasks, its crash ledger."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from manager.config import BotConfig
from manager.status import UP_STATES, InstanceState
from manager.supervision.handover import CrashLedger
from manager.supervision.instance import Instance


@dataclass
class Bot:
    """A configured bot and its slots."""

    config: BotConfig
    instances: list[Instance] = field(default_factory=list)
    ledger: CrashLedger = field(default_factory=lambda: CrashLedger(3))
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: (instance, fencing token) of the replica that last took the lease.
    active: tuple[int, int] | None = None

    @property
    def state(self) -> InstanceState:
        """The bot's overall state: the worst of its instances'."""
        states = {i.state for i in self.instances}
        for state in (InstanceState.FAILED, InstanceState.HUNG, InstanceState.BACKOFF):
            if state in states:
                return state
        if not states:
            return InstanceState.STOPPED
        if states <= UP_STATES:
            return InstanceState.RUNNING
        return min(states, key=list(InstanceState).index)
