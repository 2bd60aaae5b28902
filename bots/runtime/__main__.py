"""``python -m bots.runtime``: read the spec from stdin, run the bot, exit with its code.

structlog loads first, without the optional packages it would bring along
(:func:`bots.runtime.imports.import_structlog`); then :func:`bots.runtime.process.main`
does the work. What this process imports before the bot's own code is what every idle
bot's memory pays for: the bus client, structlog and uvloop, never pydantic.
"""

if __name__ == "__main__":
    from bots.runtime.imports import import_structlog

    import_structlog()  # before anything below imports structlog
    from bots.runtime.process import main

    main()
