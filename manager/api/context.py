"""What the HTTP API needs from the running manager (and nothing more)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from fastapi import Request

from bus import BusClient
from bus.archive import ArchiveStore
from manager.status import BotStatus

if TYPE_CHECKING:
    from manager.api.models import ApiStatus, Health
    from manager.audit import AuditBuffer
    from manager.observe.history import History


class UnknownBotError(LookupError):
    """No bot with that id is configured."""


class ManagerView(Protocol):
    """The running manager, as the routes see it."""

    @property
    def bus(self) -> BusClient:
        """The manager's own bus client (publishing, Redis, keys, dead letters)."""

    async def archive(self) -> ArchiveStore | None:
        """The archive store, or None when the manager runs without one; raises
        :class:`bus.archive.ArchiveUnavailableError` while PostgreSQL is away."""

    async def status(self) -> ApiStatus:
        """What ``multibot status --json`` prints, with the dead letters and throughput."""

    @property
    def audit_buffer(self) -> AuditBuffer:
        """Where the publishes' audit records wait to be written together."""

    @property
    def history(self) -> History:
        """The last quarter of an hour's samples, for the status page's charts."""

    def bots(self) -> list[BotStatus]:
        """Every bot and its instances (state, pid, restarts, RSS, heartbeat)."""

    async def restart_bot(self, bot_id: str) -> None:
        """Restart every instance of a bot; :class:`UnknownBotError` if there is none."""

    async def readiness(self) -> tuple[list[str], dict[str, str]]:
        """What stops the manager from serving (empty when ready), and each check's state."""

    def health(self) -> Health:
        """Cheap liveness facts: pid, uptime, the archiver's health."""

    async def metrics(self) -> bytes:
        """The Prometheus exposition of everything the manager knows."""

    def count_request(self, method: str, route: str, code: int) -> None:
        """Count one HTTP request (for ``multibot_api_requests_total``)."""


def view_of(request: Request) -> ManagerView:
    """The manager behind the application serving ``request``."""
    view: ManagerView = request.app.state.view
    return view
