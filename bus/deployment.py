"""Which Redis deployment a URL names: one node, a primary watched by a Sentinel set, or a
Redis Cluster.

``redis_url`` takes, besides redis-py's own ``redis://``, ``rediss://`` (TLS) and
``unix://``::

    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]
    rediss+sentinel://...   (TLS to the sentinels and to the data nodes)
    redis+cluster://[user:password@]host:port[,host:port...][/0][?options]
    rediss+cluster://...    (TLS to every node)

A cluster URL's hosts are seeds: any few nodes of the cluster; the client learns the rest
(and every move of a slot or failover) from them. A cluster has database 0 only.

The hosts are the sentinels; ``service_name`` is the primary's name in their config
(``sentinel monitor <service_name> ...``). The user and password, the database and every
redis-py query option (``ssl_ca_certs=``, ``socket_timeout=``, ...) apply to the data nodes;
``sentinel_username=`` and ``sentinel_password=`` log in to the sentinels themselves
(``requirepass`` in sentinel.conf), which by default need no password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio.connection import parse_url

#: Schemes of a single node, as redis-py reads them.
SINGLE_SCHEMES = ("redis", "rediss", "unix")
#: Schemes of a Sentinel-watched primary.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Schemes of a Redis Cluster.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
#: What a URL must start with, for error messages.
SCHEMES_TEXT = (
    "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// "
    "or rediss+cluster://"
)
#: Query options that log in to the sentinels, not to the data nodes.
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<netloc>[^/?#]*)(?P<rest>.*)", re.S)


def split_url(url: str) -> SplitResult:
    """``urlsplit`` for every URL here, also a Sentinel URL's host list with an IPv6 host
    after the first (``h:26379,[::1]:26380``), which newer Pythons' urlsplit refuses."""
    match = _URL.fullmatch(url)
    if match is None:
        return urlsplit(url)
    head, _, fragment = match["rest"].partition("#")
    path, _, query = head.partition("?")
    return SplitResult(match["scheme"].lower(), match["netloc"], path, query, fragment)


class RedisUrlError(ValueError):
    """A Redis URL this bus cannot use; the message says what to write instead."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``redis_url``."""

    kind: Literal["single", "sentinel", "cluster"]
    #: The URL as given.
    url: str
    #: The sentinels (``sentinel``) or the seed nodes (``cluster``); empty for a single node.
    sentinels: tuple[tuple[str, int], ...] = ()
    #: The primary's name in the sentinels' config (``sentinel``).
    service: str = ""
    #: Options for the sentinels' own connections (``sentinel``).
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    def node_url(self, host: str, port: int) -> str:
        """A single-node URL for the data node at ``host``:``port``, with this URL's user,
        password, database, TLS and options (to reach a replica directly, say)."""
        parts = split_url(self.url)
        if self.kind == "single":
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@{_host_port(host, port)}" if userinfo else _host_port(host, port)
            scheme = "redis" if parts.scheme == "unix" else parts.scheme
            return parts._replace(scheme=scheme, netloc=netloc).geturl()
        return _single_node_url(parts, host, port)

    @property
    def seeds(self) -> tuple[tuple[str, int], ...]:
        """A cluster's seed nodes (``cluster``)."""
        return self.sentinels if self.kind == "cluster" else ()

    def connection_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for the data nodes' connections (no host or port):
        user, password, database, TLS and the query's options, typed as redis-py types
        them."""
        host, port = self.sentinels[0] if self.sentinels else ("localhost", 6379)
        url = self.node_url(host, port) if self.sentinels else self.url
        options = dict(parse_url(url))
        for name in ("host", "port", "path", "connection_class"):
            options.pop(name, None)
        if split_url(url).scheme == "rediss":
            options["ssl"] = True
        return options


def parse_redis_url(url: str) -> RedisTarget:
    """The deployment ``url`` names; :class:`RedisUrlError` saying what is wrong, else."""
    parts = split_url(url)
    if parts.scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url)
    if parts.scheme in CLUSTER_SCHEMES:
        return _cluster(url, parts)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise RedisUrlError(f"must start with {SCHEMES_TEXT}")
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = tuple(_address(item, url) for item in hosts.split(",") if item)
    if not sentinels:
        raise RedisUrlError(
            "a redis+sentinel:// URL names its sentinels: "
            "redis+sentinel://host:26379,host:26379/service_name"
        )
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise RedisUrlError(
            "a redis+sentinel:// URL's path is the primary's service name and optionally a "
            f"database number (/mymaster or /mymaster/0); got {parts.path or 'none'!r}"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    sentinel_options: dict[str, Any] = {
        name.removeprefix("sentinel_"): query[name] for name in _SENTINEL_OPTIONS if name in query
    }
    if parts.scheme.startswith("rediss"):
        sentinel_options.update(
            ssl=True, **{k: v for k, v in query.items() if k.startswith("ssl_")}
        )
    return RedisTarget("sentinel", url, sentinels, path[0], sentinel_options)


def _cluster(url: str, parts: SplitResult) -> RedisTarget:
    hosts = parts.netloc.rpartition("@")[2]
    seeds = tuple(_address(item, url, "node") for item in hosts.split(",") if item)
    if not seeds:
        raise RedisUrlError(
            "a redis+cluster:// URL names some of the cluster's nodes: "
            "redis+cluster://host:7000,host:7001"
        )
    if parts.path.strip("/") not in ("", "0"):
        raise RedisUrlError(
            f"a Redis Cluster has database 0 only: drop {parts.path!r} from the URL "
            "(use the namespace setting to share one cluster between deployments)"
        )
    return RedisTarget("cluster", url, seeds)


def _single_node_url(parts: Any, host: str, port: int) -> str:
    scheme = parts.scheme.removesuffix("+sentinel").removesuffix("+cluster")
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{_host_port(host, port)}" if userinfo else _host_port(host, port)
    path = [p for p in parts.path.split("/") if p]
    db = path[1] if len(path) == 2 else "0"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    kept = urlencode([(k, v) for k, v in query if k not in _SENTINEL_OPTIONS], safe="/")
    return f"{scheme}://{netloc}/{db}" + (f"?{kept}" if kept else "")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(item: str, url: str, what: str = "sentinel") -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not port.isdigit() or not host:
        usual = "26379 is Sentinel's usual one" if what == "sentinel" else "say 7000"
        raise RedisUrlError(
            f"{item!r} in {url[:60]!r} is not host:port: name each {what} with its port ({usual})"
        )
    return host.strip("[]"), int(port)


__all__ = [
    "SCHEMES",
    "SCHEMES_TEXT",
    "RedisTarget",
    "RedisUrlError",
    "parse_redis_url",
    "split_url",
]
