"""The manager's side of a bot process's spec: :class:`RuntimeSpec`, validated.

The manager builds and validates it, and writes it to the process's stdin as JSON
(:func:`bus.supervision.spec_json`); the runtime reads that JSON back as a
:class:`~bus.supervision.PlainRuntimeSpec`, without pydantic, trusting the validation done
here. ``bus.supervision`` names it too; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bus.settings import BusSettings


class RuntimeSpec(BaseModel):
    """Everything a bot process gets from the manager; the bot never sees the manager's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bot_id: str
    instance: int = Field(ge=0)
    entry: str = Field(description="'package.module:function' called with the bus client")
    bus: BusSettings = Field(description="redis_url carries this bot's own ACL user")
    status_fd: int | None = Field(None, description="write end of the status pipe")
    heartbeat_interval: float = Field(1.0, gt=0)
    metrics_interval: float = Field(2.0, gt=0, description="seconds between metrics lines")
    stop_timeout: float = Field(10.0, gt=0)
    lease_ttl: float | None = Field(None, gt=0, description="set: an active/standby replica")
    log_level: str = "info"
    log_json: bool = True
    manager_pid: int | None = Field(None, description="exit if this process is gone")
    subscriptions: list[tuple[str, dict[str, Any]]] = Field(
        default_factory=list,
        description="declared (pattern, conditions): only such events reach the handlers",
    )
