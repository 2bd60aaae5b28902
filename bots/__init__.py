"""Example bots that coordinate through the bus; each module exposes ``async def main(bus)``.

- :mod:`bots.chatbot` — a chat bot (run as ``greeter`` and ``matcher``): replies to its
  users, takes the primary or secondary role for a user it shares with other bots (the
  smallest bot id is primary), hands such users over to the primary, and offers help when
  another bot needs load taken off it.
- :mod:`bots.shared_users` — notices a user talking to several bots within a window and
  announces ``multibot.user.shared_detected`` once, however many replicas run.

The manager runs each as a process and calls ``main`` with a ready
:class:`~bus.BusClient`; ``multibot demo`` runs them in one process on a private Redis.
"""
