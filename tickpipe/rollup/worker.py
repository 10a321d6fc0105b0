"""The rollup loop: passes until the queue of marks is empty, then a nap, until stopped.

The worker only talks to :class:`~tickpipe.rollup.store.RollupStore`. A pass
is one transaction, so stopping or crashing at any moment leaves each mark
either processed (committed) or queued for the next pass: nothing to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tickpipe.core.errors import Stopping
from tickpipe.core.service import retry
from tickpipe.core.settings import Settings, format_width
from tickpipe.rollup import metrics
from tickpipe.rollup.store import PassResult, RollupStore

log = logging.getLogger("tickpipe.rollup")

T = TypeVar("T")


class RollupWorker:
    """One of any number of competing rollup workers."""

    def __init__(self, store: RollupStore, settings: Settings, *, burst: bool = False) -> None:
        self.store = store
        self.settings = settings
        self.burst = burst
        self._stopping = asyncio.Event()
        self.passes = 0
        self.marks = 0
        self.windows = 0
        self.changed = 0
        self.emptied = 0

    def stop(self) -> None:
        """Ask the loop to finish its pass and return. Idempotent."""
        if not self._stopping.is_set():
            log.info("stopping: finishing the current pass")
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Roll up queued marks until stopped (with ``burst``, until the queue is empty)."""
        widths = self.settings.rollup_widths_s
        limit = self.settings.rollup_batch_size
        max_symbols = self.settings.rollup_max_symbols_per_pass
        log.info(
            "rollup worker: widths %s, up to %d marks of %d symbols per pass%s",
            ",".join(format_width(w) for w in widths),
            limit,
            max_symbols,
            " (burst)" if self.burst else "",
        )
        try:
            while not self.stopping:
                result = await self._pass(limit, widths, max_symbols)
                if self.burst:
                    if result.symbols == 0:
                        log.info("burst: queue drained, exiting")
                        return
                elif result.marks < limit and result.symbols < max_symbols:
                    # Neither cap was reached, so no free symbol has marks left: let
                    # marks gather for a while, so a busy window is recomputed once
                    # per poll rather than per flush.
                    await self._sleep_unless_stopped(self.settings.rollup_poll_s)
        except Stopping:
            log.warning("stopped while Postgres was unavailable; queued marks wait for a worker")

    async def backfill(self, since: dt.datetime | None, until: dt.datetime | None) -> int:
        """Queue every second holding ticks in [since, until) (all time by default)."""
        symbols = await self._retry("list the symbols of md_ticks", self.store.symbols)
        total = 0
        for done, symbol in enumerate(symbols, 1):
            if self.stopping:
                break
            total += await self._retry(
                f"queue the ticks of {symbol}",
                functools.partial(self.store.mark_symbol, symbol, since, until),
            )
            if done % 100 == 0:
                log.info("backfill: %d of %d symbols queued", done, len(symbols))
        log.info("backfill: queued %d seconds of %d symbols", total, len(symbols))
        return total

    async def _pass(self, limit: int, widths: tuple[int, ...], max_symbols: int) -> PassResult:
        started = time.perf_counter()
        result = await self._retry(
            "roll up queued marks",
            functools.partial(self.store.merge_pass, limit, widths, max_symbols=max_symbols),
        )
        if result.marks:
            elapsed = time.perf_counter() - started
            self.passes += 1
            self.marks += result.marks
            self.windows += result.windows
            self.changed += result.changed
            self.emptied += result.emptied
            metrics.PASSES.inc()
            metrics.MARKS.inc(result.marks)
            metrics.WINDOWS.inc(result.windows)
            metrics.CHANGED.inc(result.changed)
            metrics.EMPTIED.inc(result.emptied)
            metrics.PASS_SECONDS.observe(elapsed)
            log.debug(
                "rolled up %d marks of %d symbols (%d busy, left to other workers):"
                " %d windows, %d changed, %d emptied, %.1f ms",
                result.marks,
                result.symbols,
                result.busy,
                result.windows,
                result.changed,
                result.emptied,
                elapsed * 1000,
            )
        return result

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; True as soon as a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self.stopping

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``, retrying TransientError with backoff until it succeeds or a stop."""
        return await retry(
            what,
            operation,
            log=log,
            give_up=lambda exc: self.stopping,
            wait=self._sleep_unless_stopped,
            on_failure=metrics.RETRIES.inc,
        )
