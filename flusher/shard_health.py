"""Which shards failed lately, and when each may be tried again.

A flusher reads several shards, on a cluster served by several masters: one
that fails (its master down, its key unusable) is set aside with a backoff of
its own, so the other shards keep flowing, and comes back when its time is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from tickpipe.core.backoff import Backoff

log = logging.getLogger("tickpipe.flusher")


class ShardHealth:
    """Per shard: a backoff, and the moment it may be tried again."""

    def __init__(self, names: dict[int, str]) -> None:
        self._names = names
        self._backoffs: dict[int, Backoff] = {}
        self._retry_at: dict[int, float] = {}

    def ready(self, shard: int) -> bool:
        """Whether ``shard`` may be tried now (never failed, or its wait is over)."""
        return time.monotonic() >= self._retry_at.get(shard, 0.0)

    def ready_among(self, shards: Iterable[int]) -> list[int]:
        return [shard for shard in shards if self.ready(shard)]

    @property
    def failing(self) -> bool:
        """Whether some shard failed and has not answered since."""
        return bool(self._retry_at)

    def failed(self, shard: int, what: str, exc: BaseException) -> None:
        backoff = self._backoffs.setdefault(shard, Backoff())
        delay = backoff.next_delay()
        self._retry_at[shard] = time.monotonic() + delay
        log.warning(
            "shard %d (%s): cannot %s: %s; the other shards go on, retrying in %.2fs",
            shard,
            self._names.get(shard, "?"),
            what,
            exc,
            delay,
        )

    def answered(self, shard: int) -> None:
        """``shard`` did what was asked: forget its failures."""
        if self._retry_at.pop(shard, None) is not None:
            attempts = self._backoffs.pop(shard).attempt
            log.info(
                "shard %d (%s) recovered after %d retries",
                shard,
                self._names.get(shard, "?"),
                attempts,
            )

    def seconds_to_next(self) -> float:
        """Until the first failed shard may be tried again (0: one may be now)."""
        if not self._retry_at:
            return 0.0
        return max(0.0, min(self._retry_at.values()) - time.monotonic())
