"""One way to open a Redis client, shared by ingest, flusher and audit.

A Redis Cluster gets redis-py's cluster client (``RedisCluster``), which follows
MOVED and ASK redirections and refreshes its slot map after a failover; a
single Redis gets the plain client. ``REDIS_CLUSTER`` says which, or, left at
``auto``, ``INFO cluster`` tells when the client is opened. The answer decides
the key names (hash-tagged on a cluster), so it is never guessed: a process
whose Redis does not answer yet waits for it (:func:`open_client_when_ready`)
or says it cannot tell (:func:`open_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    ConnectionError,
    RedisClusterException,
    RedisError,
    TimeoutError,
    TryAgainError,
)

from tickpipe.core.backoff import Backoff
from tickpipe.core.settings import Settings, SettingsError

log = logging.getLogger("tickpipe")

REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 3.0

RedisClient: TypeAlias = Redis | RedisCluster
"""A single Redis or a Redis Cluster: the commands tickpipe uses exist on both."""

UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    BusyLoadingError,
    # Cluster: CLUSTERDOWN/MASTERDOWN during a failover, TRYAGAIN while a slot
    # migrates, redirections beyond the client's limit, no reachable node.
    ClusterError,
    TryAgainError,
    RedisClusterException,
)
"""Errors that mean "Redis is unavailable right now": retry later, nothing is known lost."""

FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException)
"""Any failure of a command, the cluster client's own (not RedisErrors) included."""

NOT_A_CLUSTER = "Cluster mode is not enabled"
"""What redis-py's cluster client says when the server it was given is a single Redis."""


class RedisConfigError(Exception):
    """The configuration contradicts the Redis it names: fix the configuration.

    Retrying cannot help (REDIS_CLUSTER=1 on a single Redis, a STREAM_SHARDS
    other than the deployment's); the message says what to change.
    """


def not_a_cluster(exc: BaseException) -> bool:
    """Whether ``exc`` is the cluster client finding a single Redis (REDIS_CLUSTER=1)."""
    return isinstance(exc, RedisClusterException) and NOT_A_CLUSTER in str(exc)


def not_a_cluster_error(url: str) -> RedisConfigError:
    return RedisConfigError(
        f"REDIS_CLUSTER=1 but the Redis at {shown_url(url)} is not a cluster"
        " (cluster_enabled:0): set REDIS_CLUSTER=0, or auto to ask the server"
    )


def shown_url(url: str) -> str:
    """``url`` fit for a log line: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class _CPacking(AbstractConnection):
    """Packs commands with hiredis' C packer.

    redis-py's asyncio connection packs every argument in Python: 0.9 µs each,
    4.5 µs per tick of a group's script call (five arguments a tick), against
    0.4 µs per tick here. Arguments hiredis does not take (``None``, ``bool``,
    ...) go to redis-py's packer, which refuses them as it always has.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])  # "CONFIG GET" is two words
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


_C_PACKING: dict[str, type[AbstractConnection]] = {}


def _c_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or unix socket) packing commands in C."""
    name = f"CPacking{connection_class.__name__}"
    if name not in _C_PACKING:
        _C_PACKING[name] = type(name, (_CPacking, connection_class), {})
    return _C_PACKING[name]


def connect(url: str, *, client_name: str, socket_timeout_s: float | None = None) -> Redis:
    """A client that never retries by itself.

    Silent retries would resend an XADD whose reply was lost (a duplicate entry)
    or hide an outage; tickpipe retries where it knows the command is safe, with
    backoff, and says so in the log. A client that sends blocking reads needs a
    ``socket_timeout_s`` longer than its longest BLOCK.
    """
    client: Redis = Redis.from_url(
        url,
        client_name=client_name,
        socket_timeout=socket_timeout_s or REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        health_check_interval=30,
    )
    pool = client.connection_pool
    pool.connection_class = _c_packing(pool.connection_class)
    return client


def connect_cluster(
    url: str, *, client_name: str, socket_timeout_s: float | None = None
) -> RedisCluster:
    """A cluster client that, like :func:`connect`, never resends a command by itself.

    It still follows MOVED and ASK (the command did not run) and, after a
    connection error, rebuilds its slot map before the next command, so a
    promoted replica is found; the caller retries what failed.
    """
    return RedisCluster.from_url(
        url,
        client_name=client_name,
        socket_timeout=socket_timeout_s or REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
        # A MOVED patches the slot map in place instead of, every 5th time,
        # closing every connection under the other tasks' feet.
        reinitialize_steps=0,
    )


async def is_cluster(url: str) -> bool:
    """Whether the server at ``url`` runs in cluster mode (``INFO cluster``)."""
    probe = connect(url, client_name="tickpipe-probe")
    try:
        info: dict[str, Any] = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


async def open_client(
    url: str, cluster: bool | None, *, client_name: str, socket_timeout_s: float | None = None
) -> RedisClient:
    """The client for ``url``: a cluster client if ``cluster`` (None: ask the server).

    A cluster client has read the slot map before it is returned. Raises the
    Redis error when the server cannot be asked (one of :data:`UNAVAILABLE`),
    :class:`RedisConfigError` when ``cluster`` is True and the server is a
    single Redis.
    """
    if cluster is None:
        cluster = await is_cluster(url)
    if not cluster:
        return connect(url, client_name=client_name, socket_timeout_s=socket_timeout_s)
    client = connect_cluster(url, client_name=client_name, socket_timeout_s=socket_timeout_s)
    try:
        await client.initialize()
    except BaseException as exc:
        with contextlib.suppress(*FAILURES, OSError):
            await client.aclose()
        if not_a_cluster(exc):
            raise not_a_cluster_error(url) from None
        raise
    return client


_WAIT_FOR: tuple[type[Exception], ...] = (*UNAVAILABLE, OSError)


async def open_client_when_ready(
    url: str,
    cluster: bool | None,
    *,
    client_name: str,
    socket_timeout_s: float | None = None,
    stop: asyncio.Event | None = None,
) -> RedisClient | None:
    """:func:`open_client`, asked again with backoff while Redis is unavailable.

    Each wait is logged. Returns None when ``stop`` is set before Redis
    answers; :class:`RedisConfigError` is raised at once (waiting cannot fix it).
    """
    backoff = Backoff(cap_s=5.0)
    question = "to answer whether it is a cluster" if cluster is None else "to answer"
    while True:
        try:
            return await open_client(
                url, cluster, client_name=client_name, socket_timeout_s=socket_timeout_s
            )
        except _WAIT_FOR as exc:
            delay = backoff.next_delay()
            log.warning(
                "waiting for Redis at %s %s (%s); asking again in %.1fs",
                shown_url(url),
                question,
                exc,
                delay,
            )
        if stop is None:
            await asyncio.sleep(delay)
            continue
        waiting = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiting}, timeout=delay)
        waiting.cancel()
        if stop.is_set():
            return None


def settings_for(settings: Settings, redis: RedisClient) -> Settings:
    """``settings`` with ``redis_cluster`` as ``redis`` found it (it decides the key names).

    Raises :class:`RedisConfigError` when the settings do not fit that kind of
    Redis (a key name with a brace of its own, on a cluster).
    """
    try:
        return settings.replace(redis_cluster=isinstance(redis, RedisCluster))
    except SettingsError as exc:
        raise RedisConfigError(f"{exc} (the Redis at REDIS_URL is a cluster)") from None


def closed_transport(exc: BaseException) -> bool:
    """A command sent on a connection another task just closed (the cluster client
    closes every connection when it rebuilds its slot map after CLUSTERDOWN)."""
    return isinstance(exc, RuntimeError) and "closed" in str(exc) and "Transport" in str(exc)


def text(value: Any) -> Any:
    """A Redis reply value as str (bytes decoded); anything else as it is."""
    return value.decode() if isinstance(value, bytes) else value


async def xrange_pages(
    redis: RedisClient, stream: str, count: int = 5000
) -> AsyncIterator[list[tuple[str, dict[bytes, bytes]]]]:
    """A whole stream, oldest first, ``count`` entries per XRANGE: never all in memory."""
    start = "-"
    while True:
        page: Any = await redis.xrange(stream, start, "+", count=count)
        if not page:
            return
        yield [(text(entry_id), fields) for entry_id, fields in page]
        if len(page) < count:
            return
        start = f"({text(page[-1][0])}"


async def ensure_group(redis: RedisClient, stream: str, group: str) -> bool:
    """Create ``group`` on ``stream`` (and the stream) reading from the very first entry.

    Returns True when this call created it. The group starts at id 0, not ``$``,
    so entries appended before any flusher started are still delivered.
    """
    from redis.exceptions import ResponseError

    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True
