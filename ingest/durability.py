"""How ``INGEST_DURABILITY=fsync`` is confirmed on the Redis at hand, or why it cannot be.

WAITAOF (Redis 7.2+, every Valkey) confirms each write's AOF fsync. A server
without it (Redis 7.0, Debian 12's) still gives the guarantee when it runs with
``appendonly yes`` and ``appendfsync always``: it fsyncs the AOF before it sends
any reply. Anything else cannot confirm a fsync, and ingest must not pretend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, Literal

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from tickpipe.core import redis_conn
from tickpipe.core.redis_conn import RedisClient, RedisConfigError

log = logging.getLogger("tickpipe.ingest")

FsyncBy = Literal["waitaof", "always"]

RECHECK_S = 5.0
"""How often a server confirmed by ``appendfsync always`` is asked again."""


@dataclasses.dataclass(frozen=True)
class ServerFacts:
    """What one Redis node says of itself."""

    label: str
    """``Redis 7.0.15`` or ``Valkey 8.1.8``."""
    has_waitaof: bool
    appendonly: str | None
    """``yes``/``no``; None where CONFIG GET is not allowed (a managed Redis)."""
    appendfsync: str | None


async def server_facts(redis: RedisClient) -> list[ServerFacts]:
    """The facts of each server that takes writes (every primary of a cluster)."""
    if isinstance(redis, RedisCluster):
        primaries = redis.get_primaries()
        return list(await asyncio.gather(*(_facts(redis, node) for node in primaries)))
    return [await _facts(redis, None)]


async def _facts(redis: RedisClient, node: Any) -> ServerFacts:
    target: dict[str, Any] = {} if node is None else {"target_nodes": node}
    info: dict[str, Any] = await redis.execute_command("INFO", "server", **target)
    redis_version = str(info.get("redis_version", "0"))
    if "valkey_version" in info:
        # Every Valkey has WAITAOF (it forked from Redis 7.2).
        label, has_waitaof = f"Valkey {info['valkey_version']}", True
    else:
        label, has_waitaof = f"Redis {redis_version}", _version(redis_version) >= (7, 2)
    appendonly = appendfsync = None
    with contextlib.suppress(ResponseError):  # CONFIG may be renamed or forbidden
        config: dict[Any, Any] = await redis.execute_command("CONFIG", "GET", "append*", **target)
        values = {redis_conn.text(k): redis_conn.text(v) for k, v in config.items()}
        appendonly, appendfsync = values.get("appendonly"), values.get("appendfsync")
    return ServerFacts(label, has_waitaof, appendonly, appendfsync)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def fsync_method(facts: list[ServerFacts], url: str) -> FsyncBy:
    """How fsync is confirmed on servers with ``facts``; RedisConfigError when it cannot be."""
    methods = {_method(one, url) for one in facts}
    return "waitaof" if methods == {"waitaof"} else "always"


def _method(facts: ServerFacts, url: str) -> FsyncBy:
    where = f"{facts.label} at {redis_conn.shown_url(url)}"
    if facts.appendonly == "no":
        raise RedisConfigError(
            f"INGEST_DURABILITY=fsync needs the AOF, but {where} runs with appendonly no:"
            " enable it (appendonly yes), or set INGEST_DURABILITY=everysec"
        )
    if facts.has_waitaof:
        return "waitaof"
    if facts.appendonly == "yes" and facts.appendfsync == "always":
        return "always"
    setting = (
        "cannot tell its appendfsync (CONFIG GET is not allowed)"
        if facts.appendfsync is None
        else f"runs with appendfsync {facts.appendfsync}"
    )
    raise RedisConfigError(
        f"INGEST_DURABILITY=fsync cannot be confirmed: {where} has no WAITAOF (it came with"
        f" Redis 7.2) and {setting}. Either upgrade it (Redis >= 7.2 or Valkey), or run it with"
        " `appendonly yes` and `appendfsync always` (the local stack: `tickpipe up"
        " --appendfsync always`); or set INGEST_DURABILITY=everysec"
    )


async def check(redis: RedisClient, url: str) -> FsyncBy:
    """:func:`fsync_method` of the servers behind ``redis``."""
    return fsync_method(await server_facts(redis), url)
