"""A private Redis Cluster for tests: three primaries and three replicas, real
``redis-server --cluster-enabled yes`` processes on free ports, joined by
``redis-cli --cluster create``, so a test can SIGKILL a primary and watch its replica take
over. Started synchronously, so one cluster can serve a whole session (a test gets it
flushed) and a test that kills a node gets its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.exceptions import RedisError

from manager.embedded.redis_server import RedisBinary
from manager.embedded.server import free_port

#: A node that has not answered for this long is failed over (fast, for tests).
NODE_TIMEOUT_MS = 1000


def redis_cli(binary: RedisBinary) -> Path | None:
    """The redis-cli beside ``binary``, else the one on PATH, else None."""
    beside = binary.path.parent / "redis-cli"
    if beside.exists():
        return beside
    found = shutil.which("redis-cli")
    return Path(found) if found else None


@dataclass
class ClusterNode:
    """One redis-server of the cluster."""

    port: int
    #: The cluster bus port (gossip between nodes), set apart: the default, port + 10000,
    #: may be taken or above 65535.
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2.0, decode_responses=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the node for the block (it answers nothing, replicates nothing); keep
        it under the node timeout, or the others fail it over."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the node (no shutdown, no save)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@dataclass
class LocalCluster:
    """``primaries`` primaries with one replica each, in ``directory``."""

    directory: Path
    binary: RedisBinary
    primaries: int = 3
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """What a bus client is given: every primary as a seed."""
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.primaries])
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        cli = redis_cli(self.binary)
        if cli is None:
            raise RuntimeError("redis-cli not found: it creates the test cluster")
        for n in range(self.primaries * 2):
            self.nodes.append(self._started(self.directory / f"node-{n}"))
        subprocess.run(
            [
                str(cli), "--cluster", "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_healthy()

    def _started(self, directory: Path) -> ClusterNode:
        """A node on free ports, answering. A port is free when picked, but another test's
        server (another xdist worker's) may bind it before this node does, which then
        exits: it is started again on other ports."""
        for _ in range(_PORT_TRIES):
            node = ClusterNode(free_port(), free_port(), directory)
            (directory / "nodes.conf").unlink(missing_ok=True)
            self._spawn(node)
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline and node.running:
                if _pings(node):
                    return node
                time.sleep(0.02)
            node.kill()
        raise AssertionError(f"no cluster node answered in {directory} after {_PORT_TRIES} tries")

    def _spawn(self, node: ClusterNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        node.process = subprocess.Popen(
            [
                str(self.binary.path),
                "--port", str(node.port), "--bind", "127.0.0.1",
                "--dir", str(node.directory),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-port", str(node.bus_port),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                "--logfile", "redis.log",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again (it rejoins from its nodes.conf)."""
        node.kill()
        self._spawn(node)
        _wait(lambda: _pings(node), f"cluster node {node.port} to answer again")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok and every primary has a
        replica in sync."""

        def healthy() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                with node.client() as client:
                    info = client.cluster("INFO")
                    if info.get("cluster_state") != "ok":
                        return False
                    if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                        return False
                    repl = client.info("replication")
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return False
            return True

        _wait(healthy, "the cluster to be healthy", timeout)

    def primary_nodes(self) -> list[ClusterNode]:
        """The nodes that are primaries now."""
        found = []
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(RedisError, OSError), node.client() as client:
                    if client.info("replication")["role"] == "master":
                        found.append(node)
        return found

    def node_for(self, key: str) -> ClusterNode:
        """The primary serving ``key``'s slot now."""
        for node in self.primary_nodes():
            with node.client() as client:
                slot = client.cluster("KEYSLOT", key)
                for start, end, primary, *_replicas in client.cluster("SLOTS"):
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(key)

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        """The running replica of ``primary``."""
        for node in self.nodes:
            if node.running and node is not primary:
                with contextlib.suppress(RedisError, OSError), node.client() as client:
                    repl = client.info("replication")
                    if repl["role"] == "slave" and int(repl["master_port"]) == primary.port:
                        return node
        raise LookupError(f"no replica of node {primary.port}")

    def reset(self) -> None:
        """Empty every primary and drop every ACL user but ``default`` on every node, so
        the next test finds the cluster as new."""
        for node in self.nodes:
            if not node.running:
                continue
            with node.client() as client:
                if client.info("replication")["role"] == "master":
                    client.flushall()
                    client.script_flush()
                for user in client.acl_users():
                    if user != "default":
                        client.acl_deluser(user)
                client.config_set("maxmemory", "0")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


#: How many pairs of free ports a node is started on before giving up.
_PORT_TRIES = 5


def _pings(node: ClusterNode) -> bool:
    try:
        with node.client() as client:
            return bool(client.ping())
    except (RedisError, OSError):
        return False


def _wait(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def local_cluster(directory: Path, binary: RedisBinary) -> Iterator[LocalCluster]:
    """A started :class:`LocalCluster`, stopped on the way out."""
    cluster = LocalCluster(directory, binary)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
