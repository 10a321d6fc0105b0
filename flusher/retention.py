"""How much acknowledged history the stream keeps, and what happens when Redis runs short.

Acknowledged entries stay in the stream for `tickpipe audit --verify` and SSE
resumes, within two bounds: STREAM_RETENTION_S (age) and
STREAM_RETENTION_MAX_ENTRIES (count, in all: each shard keeps its share). The
regular upkeep trims to both. Every FLUSH_MEMORY_CHECK_INTERVAL_S, a cheaper
check reads Redis's INFO memory: at or over STREAM_RETENTION_PRESSURE_PCT of a
non-zero maxmemory, all acknowledged history goes, down to the oldest
unacknowledged entry. Nothing unacknowledged is ever trimmed (flusher/stream.py,
TRIM_LUA). A pressure episode is logged once, when it starts, and once when
it is over (a minute without pressure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from flusher import metrics
from flusher.stream import TickStream, Trimmed
from tickpipe.core.errors import TransientError
from tickpipe.core.settings import Settings
from tickpipe.core.stream_ids import id_time_ms

log = logging.getLogger("tickpipe.flusher")

PRESSURE_QUIET_S = 60.0
"""A memory-pressure episode ends after this long without pressure."""
HELD_BACK_S = 3600.0
"""A safe point this far behind the retention floor is worth a warning."""


class Retention:
    """Trims one flusher's shards to the retention bounds; tracks memory-pressure episodes."""

    def __init__(self, settings: Settings) -> None:
        self.max_age_s = settings.stream_retention_s
        self.max_entries = -(-settings.stream_retention_max_entries // settings.stream_shards)
        """Per shard: STREAM_RETENTION_MAX_ENTRIES over the shards, rounded up."""
        self.pressure_pct = settings.stream_retention_pressure_pct
        self.check_interval_s = settings.flush_memory_check_interval_s
        self._episode_start: float | None = None
        self._pressure_seen = 0.0
        self._episode_trimmed = 0
        self._nothing_left: set[str] = set()
        """Streams found with no acknowledged entry left to trim in this episode (said once)."""

    @property
    def watches_memory(self) -> bool:
        return self.pressure_pct > 0

    @property
    def under_pressure(self) -> bool:
        """A memory-pressure episode is under way."""
        return self._episode_start is not None

    def floor(self) -> str:
        """The retention floor: entries older than this id are past STREAM_RETENTION_S."""
        return f"{max(0, int((time.time() - self.max_age_s) * 1000))}-0"

    async def trim(self, stream: TickStream) -> Trimmed:
        """The upkeep's trim of a shard: both bounds, or all acknowledged under pressure."""
        floor = self.floor()
        trimmed = await stream.trim(floor, self.max_entries, pressure_pct=self.pressure_pct)
        self._report(stream, trimmed)
        if (
            trimmed.safe_id
            and id_time_ms(trimmed.safe_id) / 1000 < id_time_ms(floor) / 1000 - HELD_BACK_S
        ):
            # Retention is not what bounds the stream: a pending entry or a group
            # that stopped reading is. Say so, or memory grows with no word why.
            log.warning(
                "trimming %s held back at %s, over an hour before the retention floor:"
                " an old pending entry or a group that stopped reading (tickpipe audit)",
                stream.stream,
                trimmed.safe_id,
            )
        return trimmed

    async def check_memory(self, stream: TickStream) -> Trimmed:
        """Trim all acknowledged history of ``stream`` if its Redis is under memory pressure."""
        trimmed = await stream.trim(
            self.floor(), self.max_entries, pressure_pct=self.pressure_pct, pressure_only=True
        )
        self._report(stream, trimmed)
        return trimmed

    async def watch_memory(
        self,
        streams: Sequence[TickStream],
        ready: Callable[[int], bool],
        sleep: Callable[[float], Awaitable[bool]],
    ) -> None:
        """Check every FLUSH_MEMORY_CHECK_INTERVAL_S until ``sleep`` says stop.

        ``ready`` tells the shards that may be used now (the others wait out a backoff).
        """
        while not await sleep(self.check_interval_s):
            for stream in streams:
                if not ready(stream.shard):
                    continue
                try:
                    await self.check_memory(stream)
                except TransientError as exc:
                    log.debug("memory check of %s skipped: %s", stream.stream, exc)
                except Exception:
                    log.exception("memory check of %s failed", stream.stream)
            self.end_if_quiet()

    def end_if_quiet(self, now: float | None = None) -> None:
        """Close the episode once no pressure was seen for PRESSURE_QUIET_S."""
        now = time.monotonic() if now is None else now
        if self._episode_start is None or now - self._pressure_seen < PRESSURE_QUIET_S:
            return
        log.info(
            "Redis memory pressure is over: %d acknowledged entries trimmed under it in %.0f s",
            self._episode_trimmed,
            self._pressure_seen - self._episode_start,
        )
        self._episode_start = None
        metrics.MEMORY_PRESSURE.set(0)

    def _report(self, stream: TickStream, trimmed: Trimmed) -> None:
        if trimmed.total:
            metrics.TRIMMED.inc(trimmed.total)
        if trimmed.pressure:
            self._pressure(stream, trimmed)
        if trimmed.by_age or trimmed.by_count:
            log.info(
                "trimmed %d acknowledged entries of %s: %d older than STREAM_RETENTION_S,"
                " %d beyond STREAM_RETENTION_MAX_ENTRIES (%s)",
                trimmed.by_age + trimmed.by_count,
                stream.stream,
                trimmed.by_age,
                trimmed.by_count,
                trimmed.count_bound,
            )

    def _pressure(self, stream: TickStream, trimmed: Trimmed) -> None:
        now = time.monotonic()
        if self._episode_start is None:
            self._episode_start = now
            self._episode_trimmed = 0
            self._nothing_left.clear()
            metrics.MEMORY_PRESSURE.set(1)
            log.warning(
                "Redis memory pressure: %s used of maxmemory %s (STREAM_RETENTION_PRESSURE_PCT"
                "=%g), seen on %s: trimming acknowledged history down to the oldest"
                " unacknowledged entry while it lasts (%d entries now). Lower"
                " STREAM_RETENTION_MAX_ENTRIES or STREAM_RETENTION_S, or give Redis more memory",
                _mib(trimmed.used_memory),
                _mib(trimmed.maxmemory),
                self.pressure_pct,
                stream.stream,
                trimmed.under_pressure,
            )
        self._pressure_seen = now
        self._episode_trimmed += trimmed.under_pressure
        metrics.TRIMMED_UNDER_PRESSURE.inc(trimmed.under_pressure)
        if (
            trimmed.under_pressure == 0
            and trimmed.safe_id
            and stream.stream not in self._nothing_left
        ):
            self._nothing_left.add(stream.stream)
            log.warning(
                "Redis memory pressure: %s has no acknowledged entry left to trim (%s used of"
                " %s): what fills the memory is unacknowledged (flushers behind, Postgres"
                " down: tickpipe audit) or not the stream's",
                stream.stream,
                _mib(trimmed.used_memory),
                _mib(trimmed.maxmemory),
            )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
