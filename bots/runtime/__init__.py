"""The bot runtime: what ``python -m bots.runtime`` runs for every bot process the manager starts.

It reads its spec (:func:`bus.supervision.read_spec`) from stdin, builds the bot's
:class:`~bus.BusClient` (with the bot's own Redis user), sends heartbeats, holds the leader
lease of an active/standby bot, and calls the bot's ``async def main(bus)``. SIGTERM or
SIGINT stops it gracefully: the consumer stops taking events and in-flight handlers get
the stop timeout to finish.

Nothing is imported here: ``python -m bots.runtime`` imports this package first, and its
``__main__`` decides what loads, and how (:mod:`bots.runtime.imports`). The runner is
:func:`bots.runtime.bot.run_bot`.
"""
