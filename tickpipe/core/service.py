"""The skeleton of a worker process (flusher, rollup): metrics endpoint, signals, the
errors an operator sees, and closing its connections whatever happens."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from prometheus_client import start_http_server

from tickpipe.core.backoff import Backoff
from tickpipe.core.errors import FatalError, Stopping, TransientError
from tickpipe.core.signals import Interrupted, Stoppable, run_until_signalled

T = TypeVar("T")


async def serve(
    work: Coroutine[Any, Any, None],
    worker: Stoppable,
    *,
    name: str,
    log: logging.Logger,
    grace_s: float,
    metrics_port: int | None,
    metrics_host: str,
    close: Callable[[], Awaitable[None]],
    error: type[Exception],
    second_signal: str,
    interrupted: str,
    fatal_suffix: str = "",
) -> None:
    """Serve metrics (when a port is set) and await ``work`` until it ends or a signal stops
    ``worker``; then ``close``. Failures are raised as ``error`` saying what to do."""
    metrics_server = None
    if metrics_port is not None:
        try:
            metrics_server, _thread = start_http_server(metrics_port, addr=metrics_host)
        except OSError as exc:
            work.close()
            await close()
            raise error(f"cannot serve metrics on port {metrics_port}: {exc.strerror}") from None
    try:
        await run_until_signalled(
            work, worker, grace_s=grace_s, name=name, log=log, second_signal=second_signal
        )
    except Interrupted:
        raise error(interrupted) from None
    except FatalError as exc:
        raise error(f"{exc}{fatal_suffix}") from None
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        await close()


async def retry(
    what: str,
    operation: Callable[[], Awaitable[T]],
    *,
    log: logging.Logger,
    give_up: Callable[[TransientError], bool],
    wait: Callable[[float], Awaitable[bool]],
    on_failure: Callable[[], None] = lambda: None,
) -> T:
    """Run ``operation``, retrying TransientError with backoff until it succeeds.

    Raises :class:`Stopping` when ``give_up`` says so after a failure, or when
    ``wait`` (the pause before the next attempt) returns True: a stop was requested.
    """
    backoff = Backoff()
    while True:
        try:
            result = await operation()
        except TransientError as exc:
            if give_up(exc):
                raise Stopping(what) from exc
            on_failure()
            delay = backoff.next_delay()
            log.warning("cannot %s: %s; retrying in %.2fs", what, exc, delay)
            if await wait(delay):
                raise Stopping(what) from exc
            continue
        if backoff.attempt:
            log.info("recovered: %s succeeded after %d retries", what, backoff.attempt)
        return result
