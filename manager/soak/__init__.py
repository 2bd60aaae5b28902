"""``multibot soak``: a fault-injection soak test proving the bus loses nothing, by exact counts.

The modules, in the order a run uses them: :mod:`~manager.soak.setup` writes the run's
config (the default config plus the soak bots), :mod:`~manager.soak.process` runs the
manager, :mod:`~manager.soak.load` publishes (a process of its own), :mod:`~manager.soak.bot`
is the soak bots' code, :mod:`~manager.soak.faults` injects the faults,
:mod:`~manager.soak.observe` samples Redis and waits for catch-up, :mod:`~manager.soak.collect`
gathers what every group handled and what PostgreSQL stored, :mod:`~manager.soak.reconcile`
compares it by event id (pure functions), :mod:`~manager.soak.report` renders it, and
:mod:`~manager.soak.run` orchestrates; :mod:`~manager.soak.command` is the click command.
"""
