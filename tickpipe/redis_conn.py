"""One way to open a Redis client, shared by ingest, flusher and audit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 3.0


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


def text(value: Any) -> Any:
    """A Redis reply value as str (bytes decoded); anything else as it is."""
    return value.decode() if isinstance(value, bytes) else value


async def xrange_pages(
    redis: Redis, stream: str, count: int = 5000
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


async def ensure_group(redis: Redis, stream: str, group: str) -> bool:
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
