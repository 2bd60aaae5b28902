"""Errors raised by the manager; each message says what to do about it."""


class ManagerError(Exception):
    """Root of every error the manager raises."""


class EmbeddedServiceError(ManagerError):
    """A private service the manager runs itself (redis-server) cannot be found or started."""
