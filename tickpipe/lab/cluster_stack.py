"""A local Redis Cluster for tests and the bench: masters and replicas on free ports.

The nodes are the same ``redis-server``/``valkey-server`` the local stack uses
(tickpipe.lab.stack.find_redis_server), each in its own directory under
``state_dir`` with AOF on and a short ``cluster-node-timeout``, so that a
killed master's replica takes over within seconds. The cluster is formed the
way ``redis-cli --cluster create`` does it, with plain commands: ADDSLOTSRANGE
on each master, MEET, REPLICATE, then a wait for ``cluster_state:ok``
everywhere. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis as redis_sync

from tickpipe.lab.processes import pid_alive
from tickpipe.lab.stack import StackError, find_redis_server, redis_server_command

SLOTS = 16384
START_TIMEOUT_S = 60.0


def _quiet(message: str) -> None:
    pass


@dataclasses.dataclass
class ClusterNodeProcess:
    port: int
    directory: Path

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def client(self, timeout_s: float = 5.0) -> redis_sync.Redis:
        return redis_sync.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout_s, decode_responses=True
        )


@dataclasses.dataclass
class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, under ``state_dir``."""

    state_dir: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1500
    log: Callable[[str], None] = _quiet
    embedded_only: bool = False
    nodes: list[ClusterNodeProcess] = dataclasses.field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL of one node: the cluster client finds the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    # -- lifecycle ---------------------------------------------------------------

    def up(self) -> None:
        """Start every node and form the cluster; returns once it serves every slot."""
        if self.masters < 1 or self.replicas < 0:
            raise StackError("a cluster needs at least one master")
        server = find_redis_server(embedded_only=self.embedded_only).path
        count = self.masters * (1 + self.replicas)
        self.nodes = [
            ClusterNodeProcess(port, self.state_dir / f"node-{port}")
            for port in _free_cluster_ports(count)
        ]
        try:
            for node in self.nodes:
                self._start(server, node)
            self._form()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop every node (harmless when they are not running)."""
        for node in self.nodes:
            self._stop(node, signal.SIGTERM)

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no last AOF write."""
        self._stop(self._node(port), signal.SIGKILL)

    def restart(self, port: int) -> None:
        """Start a stopped node again with its own cluster config (it rejoins)."""
        node = self._node(port)
        self._start(find_redis_server(embedded_only=self.embedded_only).path, node)

    # -- what the tests ask ----------------------------------------------------------

    def primaries(self) -> list[int]:
        """Ports of the nodes that are masters now."""
        return [port for port, role in self._roles().items() if role == "master"]

    def owner_of(self, slot: int) -> int:
        """The port of the master serving ``slot`` now."""
        for node in self._live_nodes():
            with contextlib.suppress(redis_sync.RedisError), node.client() as client:
                for start, end, master, *_replicas in client.execute_command("CLUSTER SLOTS"):
                    if int(start) <= slot <= int(end):
                        return int(master[1])
        raise StackError(f"no node answers for slot {slot}")

    def keyslot(self, key: str) -> int:
        node = self._live_nodes()[0]
        with node.client() as client:
            return int(client.execute_command("CLUSTER KEYSLOT", key))

    def wait_until_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Every live node reports cluster_state:ok and agrees on one owner per slot."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._all_ok():
                return
            time.sleep(0.1)
        raise StackError(f"the cluster did not reach cluster_state:ok in {timeout_s:.0f}s")

    def wait_for_failover(self, dead_port: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until a replica of the stopped ``dead_port`` serves its slots (cluster_state:ok)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._all_ok(excluding=dead_port):
                return
            time.sleep(0.1)
        raise StackError(f"no replica took over from node {dead_port} within {timeout_s:.0f}s")

    def wait_for_replica(self, master_port: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until ``master_port`` has a replica in sync (connected, link up)."""
        node = self._node(master_port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis_sync.RedisError), node.client() as client:
                info = client.info("replication")
                if any(
                    isinstance(value, dict) and value.get("state") == "online"
                    for key, value in info.items()
                    if key.startswith("slave")
                ):
                    return
            time.sleep(0.1)
        raise StackError(f"node {master_port} got no replica in sync within {timeout_s:.0f}s")

    def move_slot(self, slot: int, target_port: int, *, pause_s: float = 0.0) -> int:
        """Reshard: move ``slot`` and its keys to ``target_port`` while clients keep going.

        The steps of ``redis-cli --cluster reshard``: IMPORTING on the target,
        MIGRATING on the source, MIGRATE the keys (clients meanwhile get ASK
        for keys already moved), then SETSLOT NODE everywhere (MOVED from then
        on). ``pause_s`` holds the migrating state between keys. Returns the
        number of keys moved.
        """
        source = self._node(self.owner_of(slot))
        target = self._node(target_port)
        if source.port == target.port:
            return 0
        with source.client() as src, target.client() as dst:
            source_id, target_id = (
                src.execute_command("CLUSTER MYID"),
                dst.execute_command("CLUSTER MYID"),
            )
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            moved = 0
            while True:
                batch = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 10)
                if not batch:
                    break
                for key in batch:
                    src.execute_command(
                        "MIGRATE", "127.0.0.1", target.port, key, 0, 10_000, "REPLACE"
                    )
                    moved += 1
                    if pause_s:
                        time.sleep(pause_s)
            for node in self._live_nodes():
                with contextlib.suppress(redis_sync.RedisError), node.client() as client:
                    role = client.execute_command("ROLE")[0]
                    if role == "master":
                        client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        self.wait_until_ok()
        return moved

    # -- internals ---------------------------------------------------------------------

    def _node(self, port: int) -> ClusterNodeProcess:
        for node in self.nodes:
            if node.port == port:
                return node
        raise StackError(f"no cluster node on port {port}")

    def _live_nodes(self) -> list[ClusterNodeProcess]:
        return [node for node in self.nodes if _alive(node.pid())]

    def _start(self, server: str, node: ClusterNodeProcess) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        command = [
            *redis_server_command(server, node.port, node.directory, node.pidfile, node.logfile),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node.directory / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica may take over however long its master was silent: a
            # test kills masters on purpose.
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-replica-migration", "no",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        self.log(f"starting cluster node on port {node.port}")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(f"{server} failed to start: {result.stderr or result.stdout}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(redis_sync.RedisError), node.client(1.0) as client:
                if client.ping():
                    return
            if node.pid() is not None and not _alive(node.pid()):
                break  # it gave up (a port taken): no point waiting
            time.sleep(0.05)
        raise StackError(f"cluster node on port {node.port} did not answer; see {node.logfile}")

    def _stop(self, node: ClusterNodeProcess, signum: int) -> None:
        pid = node.pid()
        if pid is None or not _alive(pid):
            node.pidfile.unlink(missing_ok=True)
            return
        self.log(f"{'killing' if signum == signal.SIGKILL else 'stopping'} node {node.port}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            for _ in range(30):
                if not _alive(pid):
                    break
                time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.pidfile.unlink(missing_ok=True)

    def _form(self) -> None:
        masters = self.nodes[: self.masters]
        step = SLOTS // self.masters
        ids: dict[int, str] = {}
        for index, node in enumerate(masters):
            first = index * step
            last = SLOTS - 1 if index == self.masters - 1 else first + step - 1
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        for node in self.nodes:
            with node.client() as client:
                ids[node.port] = client.execute_command("CLUSTER MYID")
        with self.nodes[0].client() as first_node:
            for node in self.nodes[1:]:
                first_node.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        self._wait(lambda: all(self._known(node) == len(self.nodes) for node in self.nodes))
        for index, node in enumerate(self.nodes[self.masters :]):
            master = masters[index % self.masters]
            with node.client() as client:
                client.execute_command("CLUSTER REPLICATE", ids[master.port])
        self.wait_until_ok()
        for master in masters:
            if self.replicas:
                self.wait_for_replica(master.port)

    def _known(self, node: ClusterNodeProcess) -> int:
        with contextlib.suppress(redis_sync.RedisError), node.client() as client:
            return int(client.cluster("INFO")["cluster_known_nodes"])
        return 0

    def _roles(self) -> dict[int, str]:
        roles = {}
        for node in self._live_nodes():
            with contextlib.suppress(redis_sync.RedisError), node.client() as client:
                roles[node.port] = client.execute_command("ROLE")[0]
        return roles

    def _all_ok(self, excluding: int | None = None) -> bool:
        owners: set[tuple[int, int, int]] | None = None
        for node in self._live_nodes():
            try:
                with node.client() as client:
                    if client.cluster("INFO")["cluster_state"] != "ok":
                        return False
                    slots = {
                        (int(start), int(end), int(master[1]))
                        for start, end, master, *_ in client.execute_command("CLUSTER SLOTS")
                    }
            except redis_sync.RedisError:
                return False
            if owners is None:
                owners = slots
            elif slots != owners:
                return False
        if owners is None or any(master == excluding for _, _, master in owners):
            return False
        return sum(end - start + 1 for start, end, _ in owners) == SLOTS

    def _wait(self, predicate: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise StackError(f"the cluster did not form within {timeout_s:.0f}s")
            time.sleep(0.1)


CLUSTER_BUS_OFFSET = 10000
"""Each node also listens on its port + 10000 for the cluster bus."""
LOWEST_PORT = 12000


def _free_cluster_ports(count: int) -> list[int]:
    """``count`` ports that are free, each with its cluster-bus port free too.

    No port is another's bus port, and every bus port lies below the kernel's
    ephemeral range: an outgoing connection (or :func:`tickpipe.lab.stack.free_port`)
    cannot take one between this check and the node's bind.
    """
    highest = _ephemeral_low() - 1 - CLUSTER_BUS_OFFSET
    if highest - LOWEST_PORT < 10 * count:
        raise StackError(
            f"too few ports below the ephemeral range ({LOWEST_PORT} to {highest})"
            " for a local cluster"
        )
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < count:
        port = random.randint(LOWEST_PORT, highest)
        if port in taken or port + CLUSTER_BUS_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + CLUSTER_BUS_OFFSET):
            chosen.append(port)
            taken.update((port, port + CLUSTER_BUS_OFFSET))
    return chosen


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux; else 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int | None) -> bool:
    return pid is not None and pid_alive(pid)


@contextlib.contextmanager
def local_cluster(state_dir: Path, **options: object) -> Iterator[LocalCluster]:
    """A cluster for the length of a ``with`` block, always stopped at the end."""
    cluster = LocalCluster(state_dir, **options)  # type: ignore[arg-type]
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
