"""Backpressure: refuse new ticks (429) while the flushers are too far behind.

The backlog is the consumer group's lag (entries not yet delivered) plus its
pending entries (delivered, not yet acknowledged). One XINFO GROUPS every
INGEST_BACKLOG_POLL_S per process, never one per request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from ingest.metrics import BACKLOG_ENTRIES
from tickpipe.redis_conn import text

log = logging.getLogger("tickpipe.ingest")


class BacklogMonitor:
    def __init__(self, redis: Redis, stream: str, group: str, limit: int, poll_s: float) -> None:
        self._redis = redis
        self._stream = stream
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
            except RedisError as exc:
                log.debug("backlog poll failed: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def measure(self) -> int:
        try:
            groups: list[dict[str, Any]] = await self._redis.xinfo_groups(self._stream)
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
                lag = await self._lag_fallback(group)
            return int(lag) + pending
        # No group yet: nothing has been delivered, everything is backlog.
        length: int = await self._redis.xlen(self._stream)
        return length

    async def _lag_fallback(self, group: dict[str, Any]) -> int:
        """Redis 7.0 reports lag as nil after deletions: count from entries-read instead."""
        info: dict[str, Any] = await self._redis.xinfo_stream(self._stream)
        added, read = info.get("entries-added"), group.get("entries-read")
        if added is not None and read is not None:
            return max(0, int(added) - int(read))
        length: int = info["length"]
        return length
