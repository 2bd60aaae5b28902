"""The manager's HTTP API: events, fleet, dead letters, health, metrics, status page, docs."""
