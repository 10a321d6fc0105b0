"""The flusher loop: read a batch from the group, upsert it, COMMIT, then XACK.

The worker joins :class:`~flusher.stream.TickStream` (Redis) and
:class:`~flusher.db.TickStore` (Postgres) and talks to neither server directly.
Its one invariant: an entry is acknowledged only after the transaction holding
its row has committed. A crash anywhere leaves the entry pending, to be read
again by this consumer on restart or reclaimed by another.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flusher.db import TickStore, last_per_key
from flusher.stream import Entry, TickStream
from tickpipe.backoff import Backoff
from tickpipe.settings import Settings
from tickpipe.ticks import Tick, TickError, from_fields

log = logging.getLogger("tickpipe.flusher")

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
"""Errors that mean "a server is unavailable": retried with backoff, never fatal."""

SHUTDOWN_GRACE_S = 10.0
"""After a stop request, how long an in-flight batch may keep retrying before we give up
(its entries stay pending, nothing is lost)."""


class Flusher:
    """One consumer of the group: batches entries into Postgres until stopped."""

    def __init__(
        self, stream: TickStream, store: TickStore, settings: Settings, *, burst: bool = False
    ) -> None:
        self.stream = stream
        self.store = store
        self.settings = settings
        self.burst = burst
        self._stopping = asyncio.Event()
        self._stop_deadline: float | None = None
        self._recheck_own_pending = False
        self.rows_written = 0
        self.entries_acked = 0

    def stop(self) -> None:
        """Ask the loop to finish its in-flight batch and return. Idempotent."""
        if not self._stopping.is_set():
            log.info("stopping: finishing the in-flight batch")
            self._stop_deadline = time.monotonic() + SHUTDOWN_GRACE_S
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Drain this consumer's own pending entries, then new ones, until stopped."""
        await self._retry("create the consumer group", self.stream.ensure_group)
        log.info(
            "flusher %s reading %s as group %s",
            self.stream.consumer,
            self.stream.stream,
            self.stream.group,
        )
        await self._drain_own_pending()
        while not self.stopping:
            if self._recheck_own_pending:
                self._recheck_own_pending = False
                await self._drain_own_pending()
            batch = await self._next_batch()
            if batch:
                await self._flush(batch)
            elif self.burst:
                log.info("burst: stream drained, exiting")
                return

    async def _drain_own_pending(self) -> None:
        """Entries delivered to this consumer name before a crash or restart come first."""
        after = "0"
        size = self.settings.flush_batch_size
        while not self.stopping:
            batch = await self._retry(
                "read own pending entries",
                functools.partial(self.stream.read_own_pending, after, size),
            )
            if not batch:
                return
            log.info("re-processing %d pending entries of %s", len(batch), self.stream.consumer)
            await self._flush(batch)
            after = batch[-1].id

    async def _next_batch(self) -> list[Entry]:
        """Up to FLUSH_BATCH_SIZE entries, waiting at most FLUSH_INTERVAL_S after the first."""
        size = self.settings.flush_batch_size
        interval_ms = max(1, int(self.settings.flush_interval_s * 1000))
        batch: list[Entry] = []
        deadline: float | None = None
        while len(batch) < size and not self.stopping:
            if self.burst:
                block_ms = None
            elif deadline is None:
                block_ms = interval_ms
            else:
                block_ms = int((deadline - time.monotonic()) * 1000)
                if block_ms <= 0:
                    break
            count = size - len(batch)
            got = await self._retry(
                "read new entries", functools.partial(self._read_new, count, block_ms)
            )
            if not got:
                if batch or self.burst:
                    break
                continue
            if deadline is None:
                deadline = time.monotonic() + self.settings.flush_interval_s
            batch.extend(got)
        return batch

    async def _read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        try:
            return await self.stream.read_new(count, block_ms)
        except TRANSIENT_ERRORS:
            # Redis may have delivered entries whose reply was lost: they now wait in
            # this consumer's pending list, which only a read from 0 finds.
            self._recheck_own_pending = True
            raise

    async def _flush(self, batch: Sequence[Entry]) -> None:
        ticks: list[Tick] = []
        ids: list[str] = []
        for entry in batch:
            if entry.fields is None:
                # Trimmed or deleted while pending: nothing left to write.
                log.error("entry %s was deleted from the stream before it was written", entry.id)
                ids.append(entry.id)
                continue
            try:
                ticks.append(from_fields(entry.fields))
            except TickError as exc:
                log.error("entry %s cannot be decoded (%s); leaving it pending", entry.id, exc)
                continue
            ids.append(entry.id)
        rows = last_per_key(ticks)
        # COMMIT then XACK as one step that a cancellation cannot split.
        await asyncio.shield(self._commit_then_ack(rows, ids))

    async def _commit_then_ack(self, rows: Sequence[Tick], ids: Sequence[str]) -> None:
        started = time.perf_counter()
        await self._retry("write the batch to Postgres", functools.partial(self.store.upsert, rows))
        await self._retry("acknowledge the batch", functools.partial(self.stream.ack, ids))
        self.rows_written += len(rows)
        self.entries_acked += len(ids)
        log.debug(
            "committed %d rows, acked %d entries in %.1f ms",
            len(rows),
            len(ids),
            (time.perf_counter() - started) * 1000,
        )

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``, retrying transient errors with backoff until it succeeds.

        After a stop request, gives up once the shutdown grace has passed: what was
        not acknowledged stays pending, and a COMMIT without its XACK is replayed
        harmlessly (the upsert is idempotent).
        """
        backoff = Backoff()
        while True:
            try:
                return await operation()
            except TRANSIENT_ERRORS as exc:
                if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                    log.error("giving up on: %s (%s); entries stay pending", what, exc)
                    raise
                delay = backoff.next_delay()
                log.warning(
                    "cannot %s: %s: %s; retrying in %.2fs", what, type(exc).__name__, exc, delay
                )
                await asyncio.sleep(delay)
