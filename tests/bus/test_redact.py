"""URLs in logs and error messages carry no secret: not the password, nor a query option
naming one (redis-py reads ``?password=`` and ``?ssl_password=`` too)."""

from __future__ import annotations

import pytest

from bus.connection import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://u:pw@[::1]:6380/1", "redis://u:***@[::1]:6380/1"),
        (
            "rediss://u:pw@h:6380/0?ssl_ca_certs=/ca.crt&ssl_password=keypass",
            "rediss://u:***@h:6380/0?ssl_ca_certs=/ca.crt&ssl_password=***",
        ),
        ("unix:///run/r.sock?db=1&password=admin", "unix:///run/r.sock?db=1&password=***"),
        ("rediss://h/0?SSL_Password=k", "rediss://h/0?SSL_Password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/r.sock", "unix:///run/r.sock"),
        (
            "postgresql://m:pw@db/x?sslmode=verify-full",
            "postgresql://m:***@db/x?sslmode=verify-full",
        ),
    ],
)
def test_secrets_are_hidden_and_the_rest_kept(url: str, shown: str) -> None:
    """The password and password-like options read ***; host, port, path and other options
    stay as they were, so the message still says where."""
    assert redact(url) == shown
