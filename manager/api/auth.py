"""Bearer tokens of the HTTP API: who is calling, and may they.

Every write and admin call needs a token; there is no unauthenticated write even on the
default config. The first start generates an ``admin`` token into the data directory (mode
0600) and logs where it is, as Jupyter does. More tokens come from the config, each named
(events it publishes carry ``source = api:<name>``) with scopes ``publish``, ``read`` and
``admin`` (admin may do everything). Tokens are compared in constant time: every known
token is compared with the SHA-256 of the one presented, so neither a prefix nor which
token matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from manager.config import ApiToken, Scope
from manager.errors import ManagerError

log = structlog.get_logger("manager.api")

ADMIN = "admin"
ADMIN_TOKEN_FILE = "api-admin.token"
SCOPES: tuple[Scope, ...] = ("publish", "read", "admin")


class TokenError(ManagerError):
    """A configured token cannot be read."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: the token's name and what it may do."""

    name: str
    scopes: frozenset[str]
    #: Requests per second and at once; None: the API's defaults.
    rate: float | None = None
    burst: int | None = None

    @property
    def source(self) -> str:
        """The ``source`` of events this caller publishes."""
        return f"api:{self.name}"

    def may(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The known tokens; :meth:`caller` finds who presented one."""

    def __init__(self, known: dict[str, Caller]) -> None:
        self._known = [(_digest(token), caller) for token, caller in known.items()]

    @classmethod
    def load(cls, configured: list[ApiToken], data_dir: Path) -> Tokens:
        """The generated admin token and the configured ones; :class:`TokenError` for one
        whose file or variable cannot be read or is too short."""
        known = {admin_token(data_dir): Caller(ADMIN, frozenset(SCOPES))}
        for entry in configured:
            secret = _secret(entry)
            if secret in known:
                raise TokenError(
                    f"api token {entry.name!r} has the same secret as "
                    f"{known[secret].name!r}: give each token its own"
                )
            known[secret] = Caller(
                entry.name, frozenset(entry.scopes), entry.rate_limit, entry.rate_burst
            )
        return cls(known)

    def caller(self, token: str) -> Caller | None:
        """The caller whose token this is, or None; the same time whichever matches."""
        presented = _digest(token)
        found = None
        for digest, caller in self._known:
            if hmac.compare_digest(digest, presented):
                found = caller
        return found

    def __len__(self) -> int:
        return len(self._known)


def _secret(entry: ApiToken) -> str:
    if entry.token is not None:
        secret = entry.token
    elif entry.token_env is not None:
        secret = os.environ.get(entry.token_env, "")
        if not secret:
            raise TokenError(
                f"api token {entry.name!r}: the variable {entry.token_env} is not set or empty"
            )
    else:
        assert entry.token_file is not None
        try:
            secret = entry.token_file.read_text().strip()
        except OSError as exc:
            raise TokenError(
                f"api token {entry.name!r}: cannot read {entry.token_file} ({exc.strerror})"
            ) from None
    if len(secret) < 16:
        raise TokenError(
            f"api token {entry.name!r} is {len(secret)} characters: use at least 16 "
            "(e.g. `openssl rand -hex 32`)"
        )
    return secret


def admin_token(data_dir: Path) -> str:
    """The admin token in ``data_dir``, generated (mode 0600) on first use."""
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if len(token) >= 16:
        return token
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    staging.replace(path)
    log.warning(
        "generated the HTTP API's admin token: send it as 'Authorization: Bearer <token>'",
        path=str(path),
    )
    return token
