"""Explaining a failed TLS connection to Redis or PostgreSQL: what went wrong and which
option to fix, instead of OpenSSL's bare reason.

redis-py and asyncpg raise the :class:`ssl.SSLError` itself, or their own connection error
caused by it; :func:`tls_problem` finds it and words it for the service's URL options.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, urlsplit

#: OpenSSL's verify codes for a certificate that does not name the host connected to.
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NOT_VALID_NOW = (9, 10)  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
#: The alert a server sends when it wants a client certificate and got none (TLS 1.3; 1.2
#: sends a bare handshake failure, which has other causes too).
_CERT_REQUIRED = ("TLSV13_ALERT_CERTIFICATE_REQUIRED",)
#: Alerts a server sends when it does not accept the client certificate it got.
_CERT_REFUSED = (
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "TLSV1_ALERT_ACCESS_DENIED",
)
#: What a client sees when the other side does not speak TLS at all.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
#: Loading a certificate, key or CA file the URL names failed.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
#: A server that ends the connection right after the handshake. Under TLS 1.3 a client's
#: handshake is over before the server checked its certificate: a server refusing it sends
#: an alert and closes, and a client that already wrote its first command may get the
#: reset instead of the alert.
_CUT = (ConnectionResetError, BrokenPipeError)


@dataclass(frozen=True)
class TlsOptions:
    """A service, and how its clients name their TLS options (a URL's query parameters)."""

    service: str
    default_port: int
    #: The CA certificate(s) the server's certificate is checked against.
    ca: str
    #: The client's own certificate and its key.
    cert: str
    key: str
    #: The server's setting that makes it ask clients for certificates.
    server_client_auth: str
    #: Query option and values, or URL scheme, that mean the URL asks for TLS.
    tls_schemes: tuple[str, ...] = ()
    tls_modes: tuple[str, ...] = ()
    mode_option: str = ""

    def used_by(self, url: SplitResult) -> bool:
        """Whether ``url`` connects with TLS."""
        if url.scheme in self.tls_schemes:
            return True
        mode = dict(parse_qsl(url.query)).get(self.mode_option) if self.mode_option else None
        return mode in self.tls_modes


#: redis-py's URL query parameters (``rediss://host:port/0?ssl_ca_certs=…``).
REDIS_TLS = TlsOptions(
    "Redis",
    6379,
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "tls-auth-clients",
    tls_schemes=("rediss",),
)
#: libpq's and asyncpg's DSN parameters (``postgresql://…?sslmode=verify-full&sslrootcert=…``).
POSTGRES_TLS = TlsOptions(
    "PostgreSQL",
    5432,
    "sslrootcert",
    "sslcert",
    "sslkey",
    "clientcert in pg_hba.conf",
    tls_modes=("require", "verify-ca", "verify-full"),
    mode_option="sslmode",
)


def tls_problem(exc: BaseException, url: str, options: TlsOptions) -> str | None:
    """Why connecting to ``url`` failed with ``exc``, when TLS is the reason; else None.

    A TLS failure, or a certificate or key file the URL names that cannot be read, becomes
    one line naming the service, the host and the option to fix (never the URL's password).
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or options.default_port
    except ValueError:
        return None
    where = f"{options.service} at {host}:{port}"
    error = next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)
    if error is not None:
        return f"TLS with {where} failed: {_explain(error, host, options)}"
    if options.used_by(parts) and any(isinstance(e, _CUT) for e in _chain(exc)):
        return (
            f"{where} closed the TLS connection at once: if it requires client certificates "
            f"({options.server_client_auth}), give {options.cert} and {options.key}, a "
            "certificate signed by a CA the server trusts and its key"
        )
    if any(isinstance(e, _FILE_ERRORS) for e in _chain(exc)):
        for name, value in parse_qsl(parts.query):
            if name in (options.ca, options.cert, options.key) and not _readable(value):
                return (
                    f"TLS with {where} cannot start: the file {name}={value} is missing or "
                    "not readable by this process's user: fix the path, or the file's owner "
                    "and mode"
                )
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


def _readable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)


def _explain(error: ssl.SSLError, host: str, options: TlsOptions) -> str:
    """Why the handshake with ``host`` failed and what to check, naming ``options``."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _verify_failed(error, host, options)
    reason = error.reason or ""
    if reason in _CERT_REQUIRED:
        return (
            f"the server requires a client certificate ({options.server_client_auth}) and got "
            f"none: give {options.cert} and {options.key} (a certificate signed by a CA the "
            "server trusts, and its key)"
        )
    if reason in _CERT_REFUSED:
        return (
            f"the server refused our client certificate ({reason}): {options.cert} must be "
            "signed by a CA the server trusts, and valid today"
        )
    if reason in _NOT_TLS:
        return (
            f"the server does not speak TLS on that port ({reason}): connect to its TLS port, "
            "or to its plain port without TLS"
        )
    if error.library in ("PEM", "X509") or "PEM lib" in str(error):
        return (
            f"our client certificate cannot be loaded ({reason or error}): give both "
            f"{options.cert} and {options.key}, PEM files, the key being that certificate's"
        )
    return (
        f"the handshake failed ({error}): check {options.ca}, {options.cert} and "
        f"{options.key}, and that the server listens with TLS on that port"
    )


def _verify_failed(error: ssl.SSLCertVerificationError, host: str, options: TlsOptions) -> str:
    why = error.verify_message or str(error)
    if error.verify_code in _NAME_MISMATCH:
        return (
            f"the server's certificate is not valid for the name {host!r} ({why}): connect "
            "with a host name (or IP address) the certificate lists in its subjectAltName, or "
            f"give the server a certificate for {host!r}"
        )
    if error.verify_code in _NOT_VALID_NOW:
        return f"the server's certificate is not valid today ({why}): renew it"
    return (
        f"the server's certificate is not signed by a CA we trust ({why}): set {options.ca} "
        "to the file of the CA certificate that signed it"
    )
