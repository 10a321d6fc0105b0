"""One way to open a Redis client, shared by ingest, flusher and audit.

A Redis Cluster gets redis-py's cluster client (``RedisCluster``), which follows
MOVED and ASK redirections and refreshes its slot map after a failover; a
single Redis gets the plain client. ``REDIS_CLUSTER`` says which, or, left at
``auto``, ``INFO cluster`` tells when the client is opened.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from redis.asyncio import Redis, RedisCluster
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
    """The client for ``url``: a cluster client if ``cluster`` (None: ask the server)."""
    if cluster is None:
        try:
            cluster = await is_cluster(url)
        except RedisError as exc:
            log.warning(
                "cannot ask Redis whether it is a cluster (%s); assuming a single Redis:"
                " set REDIS_CLUSTER=1 or 0 to say which",
                exc,
            )
            cluster = False
    if cluster:
        return connect_cluster(url, client_name=client_name, socket_timeout_s=socket_timeout_s)
    return connect(url, client_name=client_name, socket_timeout_s=socket_timeout_s)


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
