"""Sharded streams: which shard a symbol belongs to, and the keys of each shard.

How and why: docs/architecture.md, "Sharding (tickpipe/core/shards.py)".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

from tickpipe.core import keys

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1
_JUMP_LCG = 2862933555777941757
MAX_SHARDS = 1024
"""A sanity bound: more streams than this would be a mistake, not a design."""


def fnv1a_64(data: bytes) -> int:
    """64-bit FNV-1a of ``data``."""
    value = FNV64_OFFSET
    for byte in data:
        value = ((value ^ byte) * FNV64_PRIME) & _MASK64
    return value


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash of a 64-bit ``key`` into ``buckets``."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * _JUMP_LCG + 1) & _MASK64
        candidate = int((bucket + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return bucket


@functools.lru_cache(maxsize=65536)
def shard_of(symbol: str, shards: int) -> int:
    """The shard (0 to ``shards`` - 1) whose stream carries every tick of ``symbol``."""
    if shards == 1:
        return 0
    return jump_hash(fnv1a_64(symbol.encode("utf-8")), shards)


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """The keys of one shard; all in one cluster slot (they share the hash tag)."""

    index: int
    stream: str
    latest: str
    dead_stream: str
    lost: str
    heartbeats: str
    """The base of the shard's heartbeat keys (keys.heartbeat_key)."""

    @property
    def lost_ids(self) -> str:
        """The set of the lost ids counted in ``lost`` (each counted once)."""
        return f"{self.lost}:ids"

    def heartbeat(self, group: str, consumer: str) -> str:
        """The key that says ``consumer`` is alive, refreshed while it reads this shard."""
        return keys.heartbeat_key(self.heartbeats, group, consumer)

    def heartbeats_seen(self, group: str) -> str:
        """The hash of the consumers of ``group`` that ever sent a heartbeat on this shard."""
        return keys.heartbeats_seen_key(self.heartbeats, group)


@dataclasses.dataclass(frozen=True, slots=True)
class ShardMap:
    """Every shard of a deployment, and the shard of each symbol."""

    shards: tuple[Shard, ...]

    @classmethod
    def build(
        cls,
        count: int,
        *,
        stream: str = keys.STREAM,
        latest: str = keys.LATEST,
        dead_stream: str = keys.DEAD_STREAM,
        lost: str = keys.LOST,
        tagged: bool = False,
    ) -> ShardMap:
        """The ``count`` shards named after the given base names (see keys.shard_key)."""
        if not 1 <= count <= MAX_SHARDS:
            raise ValueError(f"the number of shards must be 1 to {MAX_SHARDS}, got {count}")
        return cls(
            tuple(
                Shard(
                    index,
                    keys.shard_key(stream, index, count, tagged=tagged),
                    keys.shard_key(latest, index, count, tagged=tagged),
                    keys.shard_key(dead_stream, index, count, tagged=tagged),
                    keys.shard_key(lost, index, count, tagged=tagged),
                    keys.shard_key(stream + keys.HEARTBEATS, index, count, tagged=tagged),
                )
                for index in range(count)
            )
        )

    @property
    def count(self) -> int:
        return len(self.shards)

    def for_symbol(self, symbol: str) -> Shard:
        return self.shards[shard_of(symbol, len(self.shards))]

    def select(self, indexes: Iterable[int]) -> tuple[Shard, ...]:
        """The shards with these indexes (all of them when ``indexes`` is empty)."""
        chosen = sorted(set(indexes))
        if not chosen:
            return self.shards
        outside = [i for i in chosen if not 0 <= i < len(self.shards)]
        if outside:
            raise ValueError(
                f"no shard {outside[0]}: STREAM_SHARDS={len(self.shards)} has shards"
                f" 0 to {len(self.shards) - 1}"
            )
        return tuple(self.shards[i] for i in chosen)
