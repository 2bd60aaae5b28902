"""The soak run's config: the default config with the two soak bots added.

``soak-plain`` (2 replicas, a plain handler) and ``soak-once`` (1 replica, the run-once
helper) subscribe to ``soak.*`` and record what they handle (:mod:`manager.soak.bot`).
Their consumer settings are short so a run sees every recovery path within its duration:
a hung handler is cancelled after :data:`HANDLER_TIMEOUT` seconds (two attempts, then a
``timeout`` dead letter) and a killed replica's entries may be reclaimed after
:data:`VISIBILITY_TIMEOUT` seconds. Their restart policy never gives up (the soak kills
them on purpose, often), with a short backoff.
"""

from __future__ import annotations

from pathlib import Path

from manager.config import DEFAULT_CONFIG_PATH, load_config
from manager.soak.bot import RECORDS_ENV, RUN_ONCE_ENV

#: The soak bots, as (bot id, replicas, run-once).
SOAK_BOTS = (("soak-plain", 2, False), ("soak-once", 1, True))
HANDLER_TIMEOUT = 2.0
VISIBILITY_TIMEOUT = 10.0

_BOT = """
[[bots]]
id = "{bot_id}"
entry = "manager.soak.bot:main"
replicas = {replicas}
subscriptions = [{{ pattern = "soak.*" }}]
environment = {{ {records_env} = "{records}", {run_once_env} = "{run_once}" }}
stop_timeout = 5.0

[bots.consumer]
handler_timeout = {timeout}
visibility_timeout = {visibility}
retry = {{ max_attempts = 2, backoff_base = 0.2 }}

[bots.restart]
policy = "always"
backoff_base = 0.5
backoff_cap = 2.0
crash_loop_restarts = 1000
"""


def soak_groups() -> list[str]:
    """The consumer groups of the soak bots."""
    return [f"bot-group-{bot_id}" for bot_id, _, _ in SOAK_BOTS]


def write_config(work: Path, records: Path, base: Path = DEFAULT_CONFIG_PATH) -> Path:
    """Write ``work/multibot.toml``: ``base`` plus the soak bots recording into ``records``;
    validated (a :class:`~manager.config.ConfigError` says what is wrong)."""
    text = base.read_text()
    for bot_id, replicas, run_once in SOAK_BOTS:
        text += _BOT.format(
            bot_id=bot_id,
            replicas=replicas,
            records_env=RECORDS_ENV,
            records=str(records).replace("\\", "\\\\").replace('"', '\\"'),
            run_once_env=RUN_ONCE_ENV,
            run_once="1" if run_once else "0",
            timeout=HANDLER_TIMEOUT,
            visibility=VISIBILITY_TIMEOUT,
        )
    path = work / "multibot.toml"
    path.write_text(text)
    load_config(path)
    return path
