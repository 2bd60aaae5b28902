"""The archive and Redis housekeeping: the archiver, trimming, retention, memory pressure,
removed bots' groups, group positions and the restore after a Redis reset. Imports
:mod:`manager.observe` and the base modules."""
