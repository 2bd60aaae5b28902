"""The embedded servers: redis-server and PostgreSQL as child processes, found, started,
watched and restarted by the manager when no URL is configured. Imports only the base
modules of :mod:`manager` (errors, config)."""
