"""Backpressure: refuse new ticks (429) while the flushers are too far behind.

The backlog is the consumer group's lag (entries not yet delivered) plus its
pending entries (delivered, not yet acknowledged), summed over every shard's
stream: INGEST_MAX_BACKLOG bounds the whole. One XINFO GROUPS per shard every
INGEST_BACKLOG_POLL_S per process (concurrently), never one per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from ingest.metrics import BACKLOG_ENTRIES
from tickpipe.core.redis_conn import FAILURES, RedisClient, text

log = logging.getLogger("tickpipe.ingest")


class BacklogMonitor:
    def __init__(
        self, redis: RedisClient, streams: Sequence[str], group: str, limit: int, poll_s: float
    ) -> None:
        self._redis = redis
        self._streams = tuple(streams)
        self._group = group
        self.limit = limit
        self.poll_s = poll_s
        self.backlog: int | None = None
        """Last backlog seen; None until the first successful poll."""

    @property
    def over_limit(self) -> bool:
        return self.backlog is not None and self.backlog > self.limit

    async def run(self) -> None:
        """Poll until cancelled; a Redis outage keeps the last value (503s tell the rest)."""
        while True:
            try:
                self.backlog = await self.measure()
                BACKLOG_ENTRIES.set(self.backlog)
            except FAILURES as exc:
                log.debug("backlog poll failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def measure(self) -> int:
        """Lag plus pending of the group, summed over the shards."""
        backlogs = await asyncio.gather(*(self._measure(stream) for stream in self._streams))
        return sum(backlogs)

    async def _measure(self, stream: str) -> int:
        try:
            groups: list[dict[str, Any]] = await self._redis.xinfo_groups(stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        for group in groups:
            if text(group["name"]) != self._group:
                continue
            pending = int(group["pending"])
            lag = group.get("lag")
            if lag is None:
                lag = await self._lag_fallback(stream, group)
            return int(lag) + pending
        # No group yet: nothing has been delivered, everything is backlog.
        length: int = await self._redis.xlen(stream)
        return length

    async def _lag_fallback(self, stream: str, group: dict[str, Any]) -> int:
        """Redis 7.0 reports lag as nil after deletions: count from entries-read instead."""
        info: dict[str, Any] = await self._redis.xinfo_stream(stream)
        added, read = info.get("entries-added"), group.get("entries-read")
        if added is not None and read is not None:
            return max(0, int(added) - int(read))
        length: int = info["length"]
        return length
