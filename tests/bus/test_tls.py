"""bus.tls: a failed connection is explained as a TLS problem only when TLS is the reason."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from bus.tls import POSTGRES_TLS, REDIS_TLS, tls_problem


def cut(error: BaseException) -> RedisConnectionError:
    """redis-py's error for a connection that ``error`` ended, as it raises it."""
    try:
        raise RedisConnectionError("Error while reading from localhost:6380") from error
    except RedisConnectionError as exc:
        return exc


class TestTlsProblem:
    def test_connection_cut_after_a_tls_handshake_names_client_certificates(self) -> None:
        """Over rediss://, a reset right away (a refused client certificate under TLS 1.3
        may show so) points at ssl_certfile and ssl_keyfile."""
        problem = tls_problem(
            cut(ConnectionResetError(104, "reset")), "rediss://:pw@localhost:6380/0", REDIS_TLS
        )
        assert problem is not None
        assert problem.startswith("Redis at localhost:6380 closed the TLS connection at once")
        assert "give ssl_certfile and ssl_keyfile" in problem
        assert "pw" not in problem

    def test_errors_without_tls_are_left_alone(self) -> None:
        """A reset on a plain URL, or a refused connection, is no TLS problem."""
        reset = cut(ConnectionResetError(104, "reset"))
        assert tls_problem(reset, "redis://localhost:6380/0", REDIS_TLS) is None
        assert tls_problem(reset, "postgresql://x@h/db?sslmode=disable", POSTGRES_TLS) is None
        refused = cut(ConnectionRefusedError(111, "refused"))
        assert tls_problem(refused, "rediss://localhost:6380/0", REDIS_TLS) is None

    def test_postgres_tls_is_told_by_sslmode(self) -> None:
        """A DSN asks for TLS by sslmode (require, verify-ca, verify-full)."""
        reset = ConnectionResetError(104, "reset")
        problem = tls_problem(reset, "postgresql://x@db:5433/a?sslmode=verify-full", POSTGRES_TLS)
        assert problem is not None
        assert problem.startswith("PostgreSQL at db:5433 closed the TLS connection at once")
        assert "give sslcert and sslkey" in problem
