"""Running one rollup worker process: the pool, signals, metrics endpoint, exit status."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from prometheus_client import start_http_server

from tickpipe.core.errors import FatalError, Stopping
from tickpipe.core.settings import Settings
from tickpipe.core.signals import Interrupted, run_until_signalled
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
    metrics_server = None
    if settings.rollup_metrics_port is not None:
        try:
            metrics_server, _thread = start_http_server(
                settings.rollup_metrics_port, addr=settings.rollup_metrics_host
            )
        except OSError as exc:
            await store.close()
            raise RollupError(
                f"cannot serve metrics on port {settings.rollup_metrics_port}: {exc.strerror}"
            ) from None
    try:
        await run_until_signalled(
            _work(worker, backfill),
            worker,
            grace_s=settings.rollup_shutdown_grace_s,
            name="rollup",
            log=log,
            second_signal="stopping now; the current pass rolls back",
        )
    except Interrupted:
        raise RollupError(
            "stopped in the middle of a pass; it rolled back and its marks wait for a worker"
        ) from None
    except FatalError as exc:
        raise RollupError(str(exc)) from None
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        await store.close()
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
