"""``multibot bench``: throughput, latency, losses and RSS of the bus, next to bare redis-py.

Deliberately empty: worker processes import :mod:`manager.bench.child`, and everything this
package imported here would count in the RSS they measure. The command is
:data:`manager.bench.command.bench`; the runner is :func:`manager.bench.runner.run_bench`.
"""
