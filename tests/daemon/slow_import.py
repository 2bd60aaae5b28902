"""A bot whose import takes :data:`IMPORT_SECONDS` (a heavy bot on a loaded machine), then
consumes like ``sample_bots.steady``. Its import blocks, so it sends no heartbeat until then."""

from __future__ import annotations

import time

from tests.daemon.sample_bots import steady

#: Seconds the import blocks: past the tests' heartbeat timeout, within their start-up timeout.
IMPORT_SECONDS = 4.0

time.sleep(IMPORT_SECONDS)  # the point of this module: a slow import
main = steady
