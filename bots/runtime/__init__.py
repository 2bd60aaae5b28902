"""The bot runtime: what ``python -m bots.runtime`` runs for every bot process the manager starts.

It reads its :class:`~bus.supervision.RuntimeSpec` from stdin, builds the bot's
:class:`~bus.BusClient` (with the bot's own Redis user), sends heartbeats, holds the leader
lease of an active/standby bot, and calls the bot's ``async def main(bus)``. SIGTERM or
SIGINT stops it gracefully: the consumer stops taking events and in-flight handlers get
the stop timeout to finish.
"""

from bots.runtime.bot import run_bot

__all__ = ["run_bot"]
