"""The flusher's Redis side: read through the consumer group, acknowledge."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from tickpipe import redis_conn


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry. ``fields`` is None when the entry was deleted from the stream."""

    id: str
    fields: dict[bytes, bytes] | None


class TickStream:
    """The stream and consumer group, as one flusher consumer sees them."""

    def __init__(self, redis: Redis, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer

    async def ensure_group(self) -> None:
        await redis_conn.ensure_group(self.redis, self.stream, self.group)

    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to any consumer (``>``), waiting up to ``block_ms``."""
        return await self._read(">", count, block_ms)

    async def read_own_pending(self, after: str, count: int) -> list[Entry]:
        """This consumer's pending entries with ids greater than ``after`` (start at ``0``)."""
        return await self._read(after, count, None)

    async def ack(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        acked: int = await self.redis.xack(self.stream, self.group, *ids)
        return acked

    async def _read(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count, block=block_ms
        )
        entries: list[Entry] = []
        for _stream, messages in reply or []:
            for raw_id, fields in messages:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                entries.append(Entry(entry_id, fields or None))
        return entries
