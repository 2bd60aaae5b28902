"""Running the bots: the supervisor, each instance and its process, restart policy,
active/standby handover, and the coordinator that watches lag and memory. Imports
:mod:`manager.observe` and the base modules."""
