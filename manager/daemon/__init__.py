"""The manager process: the wiring of every part (:mod:`manager.daemon.manager`) and the
Redis users it provisions for the bots. Imports every subpackage but the command line and
the tools; importing this package itself loads nothing (``multibot status`` stays fast)."""
