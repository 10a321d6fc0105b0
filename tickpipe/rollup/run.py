"""Running one rollup worker process: the pool, signals, metrics endpoint, exit status."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from tickpipe.core.errors import Stopping
from tickpipe.core.service import serve
from tickpipe.core.settings import Settings
from tickpipe.rollup.store import RollupStore
from tickpipe.rollup.worker import RollupWorker

log = logging.getLogger("tickpipe.rollup")


class RollupError(RuntimeError):
    """The worker cannot work with this configuration; the message says what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class Backfill:
    """Queue the seconds holding ticks in [since, until) before rolling up (None: unbounded)."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None


async def run_rollup(
    settings: Settings, *, burst: bool = False, backfill: Backfill | None = None
) -> RollupWorker:
    """Run a rollup worker until SIGTERM/SIGINT (or, with ``burst``, until the queue is empty)."""
    store = await RollupStore.open(settings.database_url)
    worker = RollupWorker(store, settings, burst=burst)
    await serve(
        _work(worker, backfill),
        worker,
        name="rollup",
        log=log,
        grace_s=settings.rollup_shutdown_grace_s,
        metrics_port=settings.rollup_metrics_port,
        metrics_host=settings.rollup_metrics_host,
        close=store.close,
        error=RollupError,
        second_signal="stopping now; the current pass rolls back",
        interrupted="stopped in the middle of a pass; it rolled back and its marks wait for"
        " a worker",
    )
    log.info(
        "rollup worker stopped: %d passes, %d marks, %d windows recomputed, %d changed, %d emptied",
        worker.passes,
        worker.marks,
        worker.windows,
        worker.changed,
        worker.emptied,
    )
    return worker


async def _work(worker: RollupWorker, backfill: Backfill | None) -> None:
    if backfill is not None:
        try:
            await worker.backfill(backfill.since, backfill.until)
        except Stopping:
            log.warning("backfill interrupted: run it again (queuing a second twice is harmless)")
            return
    await worker.run()
