"""Reading a redis_url: one node, a primary named by a Sentinel set, or a Redis Cluster."""

from __future__ import annotations

import pytest

from bus.deployment import RedisUrlError, parse_redis_url, split_url
from bus.settings import BusSettings


class TestParse:
    @pytest.mark.parametrize(
        "url", ["redis://localhost:6379/0", "rediss://h:1/0?ssl_ca_certs=/ca", "unix:///r.sock"]
    )
    def test_single_node_urls_are_redis_pys(self, url: str) -> None:
        """redis-py's own schemes name one node, as before."""
        target = parse_redis_url(url)
        assert (target.kind, target.url, target.sentinels) == ("single", url, ())

    def test_a_sentinel_url_names_sentinels_service_and_database(self) -> None:
        """Hosts are the sentinels; the path is the service and the database; the user and
        password and query options are the data nodes', sentinel_* the sentinels'."""
        target = parse_redis_url(
            "redis+sentinel://app:secret@10.0.0.1:26379,[::1]:26380/orders/3"
            "?socket_timeout=2&sentinel_password=s3"
        )
        assert target.kind == "sentinel"
        assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
        assert target.service == "orders"
        assert target.sentinel_options == {"password": "s3"}
        options = target.connection_options()
        assert (options["username"], options["password"], options["db"]) == ("app", "secret", 3)
        assert options["socket_timeout"] == 2.0 and "sentinel_password" not in options

    def test_a_cluster_url_names_seed_nodes_with_one_login(self) -> None:
        """Hosts are seeds (any few nodes); user, password and options reach every node;
        the database is 0, whether the path says /0 or nothing."""
        target = parse_redis_url(
            "rediss+cluster://app:pw@10.0.0.1:7000,[::1]:7001/0?ssl_ca_certs=/ca"
        )
        assert target.kind == "cluster"
        assert target.seeds == (("10.0.0.1", 7000), ("::1", 7001))
        options = target.connection_options()
        assert (options["username"], options["password"], options["db"]) == ("app", "pw", 0)
        assert options["ssl"] is True and options["ssl_ca_certs"] == "/ca"
        assert parse_redis_url("redis+cluster://h:7000").seeds == (("h", 7000),)
        assert parse_redis_url("redis://h:1/0").seeds == ()

    def test_tls_reaches_sentinels_and_data_nodes(self) -> None:
        """rediss+sentinel:// speaks TLS to both, with the URL's CA."""
        target = parse_redis_url("rediss+sentinel://h:26379/main?ssl_ca_certs=/etc/ca.crt")
        assert target.sentinel_options == {"ssl": True, "ssl_ca_certs": "/etc/ca.crt"}
        options = target.connection_options()
        assert options["ssl"] is True and options["ssl_ca_certs"] == "/etc/ca.crt"
        assert options["db"] == 0

    def test_node_url_reaches_one_data_node_with_the_same_login(self) -> None:
        """A replica the primary lists is reached with the URL's user, database and TLS."""
        target = parse_redis_url("rediss+sentinel://u:p@h:26379/main/1?ssl_ca_certs=/ca")
        assert target.node_url("10.1.1.1", 6380) == "rediss://u:p@10.1.1.1:6380/1?ssl_ca_certs=/ca"
        single = parse_redis_url("redis://u:p@h:6379/2")
        assert single.node_url("10.1.1.1", 6380) == "redis://u:p@10.1.1.1:6380/2"

    @pytest.mark.parametrize(
        ("url", "says"),
        [
            ("http://h:1/0", "must start with redis://"),
            ("redis+sentinel:///main", "names its sentinels"),
            ("redis+sentinel://h/main", "is not host:port"),
            ("redis+sentinel://h:26379", "path is the primary's service name"),
            ("redis+sentinel://h:26379/main/x", "path is the primary's service name"),
            ("redis+sentinel://h:26379/a/1/2", "path is the primary's service name"),
            ("redis+cluster:///", "names some of the cluster's nodes"),
            ("redis+cluster://h/", "is not host:port"),
            ("redis+cluster://h:7000/3", "database 0 only"),
        ],
    )
    def test_bad_urls_say_what_to_write(self, url: str, says: str) -> None:
        """Each mistake is refused with the form to use."""
        with pytest.raises(RedisUrlError, match=says):
            parse_redis_url(url)

    def test_settings_refuse_a_bad_url(self) -> None:
        """BusSettings checks redis_url with the same parser."""
        with pytest.raises(ValueError, match="names its sentinels"):
            BusSettings(redis_url="redis+sentinel:///main")
        assert BusSettings(redis_url="redis+sentinel://h:26379/main").redis_url


class TestHostLists:
    def test_an_ipv6_sentinel_after_the_first_is_read_redacted_and_rewritten(self) -> None:
        """A host list with a bracketed IPv6 host after the first (which some Pythons'
        urlsplit refuses) parses, hides its password in logs, and becomes a bot's URL."""
        from bus.connection import redact
        from manager.daemon.redis_acl import bot_redis_url

        url = "redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/main/0"
        assert split_url(url).netloc == ":pw@10.0.0.1:26379,[::1]:26380"
        assert redact(url) == "redis+sentinel://:***@10.0.0.1:26379,[::1]:26380/main/0"
        bot = bot_redis_url(url, "b", "s")
        assert bot == "redis+sentinel://b:s@10.0.0.1:26379,[::1]:26380/main/0"
