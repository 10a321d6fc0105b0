"""The deployment's shape, recorded in Redis: how many shards, plain or hash-tagged names.

Changing STREAM_SHARDS moves symbols to other streams: entries still waiting in
a stream of the old shape would be read by nobody (or out of order with the
new ones). So ingest and the flushers record the shape they run with, one
field per stream name in the hash ``keys.SHAPE``, and refuse to start with
another. ``tickpipe shards set N`` changes it once every stream named like the
stream is drained (docs/scaling.md, "Changing STREAM_SHARDS").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ResponseError

from tickpipe.core import keys
from tickpipe.core.redis_conn import RedisClient, RedisConfigError, text
from tickpipe.core.settings import Settings
from tickpipe.core.shards import MAX_SHARDS

DRAIN_DOC = "docs/scaling.md, 'Changing STREAM_SHARDS'"


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """``shards`` streams, their names hash-tagged (``ticks.received:{3}``) or not."""

    shards: int
    tagged: bool

    @classmethod
    def of(cls, settings: Settings) -> Shape:
        """The shape ``settings`` run with (``redis_cluster`` must be known)."""
        return cls.named(settings.stream_shards, cluster=bool(settings.redis_cluster))

    @classmethod
    def named(cls, shards: int, *, cluster: bool) -> Shape:
        """``shards`` streams named as keys.shard_key names them: tagged if several or a cluster."""
        return cls(shards, shards > 1 or cluster)

    @classmethod
    def parse(cls, raw: str) -> Shape:
        count, _, naming = raw.partition(" ")
        if not count.isdigit() or not 1 <= int(count) <= MAX_SHARDS:
            raise ValueError(raw)
        if naming not in ("tagged", "plain"):
            raise ValueError(raw)
        return cls(int(count), naming == "tagged")

    def __str__(self) -> str:
        return f"{self.shards} {'tagged' if self.tagged else 'plain'}"

    def describe(self) -> str:
        if self.shards == 1:
            names = "hash-tagged names (a Redis Cluster)" if self.tagged else "plain names"
            return f"STREAM_SHARDS=1 with {names}"
        return f"STREAM_SHARDS={self.shards}"


class ShapeMismatch(RedisConfigError):
    """This process's STREAM_SHARDS is not the deployment's."""


async def recorded(redis: RedisClient, stream_name: str) -> Shape | None:
    """The shape recorded for ``stream_name`` (None: none yet)."""
    raw = await redis.hget(keys.SHAPE, stream_name)
    if raw is None:
        return None
    try:
        return Shape.parse(text(raw))
    except ValueError:
        raise ShapeMismatch(
            f"{keys.SHAPE} holds {text(raw)!r} for {stream_name}, not a shape like '4 tagged':"
            f" set it with `tickpipe shards set N` ({DRAIN_DOC})"
        ) from None


async def claim(redis: RedisClient, settings: Settings) -> Shape:
    """Record the shape of ``settings`` if none is; raise :class:`ShapeMismatch` on another."""
    mine = Shape.of(settings)
    await redis.hsetnx(keys.SHAPE, settings.stream_name, str(mine))
    theirs = await recorded(redis, settings.stream_name)
    if theirs is not None and theirs != mine:
        raise ShapeMismatch(
            f"this deployment runs {theirs.describe()} (recorded in Redis, {keys.SHAPE}), this"
            f" process is configured for {mine.describe()}: the two spread ticks over different"
            f" streams, and entries left in the old ones would be read by nobody. Start it with"
            f" the deployment's STREAM_SHARDS, or change the shape after draining: stop ingest,"
            f" let the flushers empty the streams, then `tickpipe shards set"
            f" {mine.shards}` ({DRAIN_DOC})"
        )
    return mine


@dataclasses.dataclass(frozen=True, slots=True)
class Outstanding:
    """What one stream still holds for the group: delivered but not acknowledged, undelivered."""

    stream: str
    length: int
    pending: int
    undelivered: int | None
    """None: unknown (Redis 7.0 after deletions), but at least one."""
    dead_letters: bool = False
    """A dead-letter stream: ``length`` letters wait for `tickpipe dlq`."""

    @property
    def drained(self) -> bool:
        return self.pending == 0 and self.undelivered == 0

    def describe(self) -> str:
        if self.dead_letters:
            return f"{self.stream}: {self.length} dead letters"
        undelivered = "some" if self.undelivered is None else str(self.undelivered)
        return f"{self.stream}: {self.pending} pending, {undelivered} undelivered"


async def outstanding(redis: RedisClient, stream: str, group: str) -> Outstanding:
    """How far ``group`` is from having written everything of ``stream``."""
    try:
        info: dict[str, Any] = await redis.xinfo_stream(stream)
    except ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        return Outstanding(stream, 0, 0, 0)
    length = int(info["length"])
    for found in await redis.xinfo_groups(stream):
        if text(found["name"]) != group:
            continue
        lag = found.get("lag")
        if lag is None:
            added, read = info.get("entries-added"), found.get("entries-read")
            if added is not None and read is not None:
                lag = max(0, int(added) - int(read))
            else:
                after = f"({text(found['last-delivered-id'])}"
                lag = None if await redis.xrange(stream, after, "+", count=1) else 0
        return Outstanding(stream, length, int(found["pending"]), lag)
    return Outstanding(stream, length, 0, length)  # no group yet: nothing was delivered


def _named_like(base: str) -> re.Pattern[str]:
    return re.compile(re.escape(base) + r"(?::\{\d+\})?")


async def streams_named_like(redis: RedisClient, base: str) -> AsyncIterator[str]:
    """Every stream named ``base`` or ``base:{N}``, on every master of a cluster."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", base) + "*"
    like = _named_like(base)
    seen: set[str] = set()
    async for raw in redis.scan_iter(match=pattern, count=1000, _type="stream"):
        name = text(raw)
        if like.fullmatch(name) and name not in seen:
            seen.add(name)
            yield name


async def stranded(
    redis: RedisClient, settings: Settings, *, keep: frozenset[str] = frozenset()
) -> list[Outstanding]:
    """Streams named like the stream, outside ``keep``, that still hold entries for the group.

    Dead-letter streams outside ``keep`` that hold letters count too (their
    letters as undelivered: nothing lists or replays them any more).
    """
    found: list[Outstanding] = []
    async for stream in streams_named_like(redis, settings.stream_name):
        if stream in keep:
            continue
        left = await outstanding(redis, stream, settings.group_name)
        if not left.drained:
            found.append(left)
    async for dead in streams_named_like(redis, settings.dead_stream_name):
        if dead in keep:
            continue
        letters = int(await redis.xlen(dead))
        if letters:
            found.append(Outstanding(dead, letters, 0, letters, dead_letters=True))
    return sorted(found, key=lambda left: left.stream)


def current_names(settings: Settings) -> frozenset[str]:
    """The stream and dead-letter stream names of every shard ``settings`` use."""
    shards = settings.shard_map.shards
    return frozenset(s.stream for s in shards) | frozenset(s.dead_stream for s in shards)


async def change(redis: RedisClient, settings: Settings, shards: int) -> tuple[Shape | None, Shape]:
    """Record ``shards`` as the deployment's shape once nothing waits in any stream.

    Every stream named like the stream must be drained and every dead-letter
    stream empty, whether its name remains or not: a symbol that moves to
    another shard must not have entries waiting in two streams.

    Returns (the shape recorded before, the new one); raises
    :class:`ShapeMismatch` listing the streams still to drain.
    """
    new = Shape.named(shards, cluster=bool(settings.redis_cluster))
    old = await recorded(redis, settings.stream_name)
    if old == new:
        return old, new
    # Every stream, kept or not: a symbol that moves must not have entries in two.
    waiting = await stranded(redis, settings)
    if waiting:
        raise ShapeMismatch(
            "entries still wait in the streams: "
            + "; ".join(left.describe() for left in waiting)
            + f". Drain them first (and replay or drop dead letters) ({DRAIN_DOC})"
        )
    await redis.hset(keys.SHAPE, settings.stream_name, str(new))
    return old, new
