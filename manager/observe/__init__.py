"""Watching the fleet: consumer lag, memory against the budget, thresholds, the Prometheus
rendering, the fleet's event counters and systemd's notify socket. Imports only the base
modules of :mod:`manager`."""
