"""``python -m manager.cli``: the ``multibot`` command."""

from manager.cli import main

main(prog_name="multibot")
