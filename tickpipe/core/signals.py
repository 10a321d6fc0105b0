"""Running a worker until SIGTERM/SIGINT: stop gracefully, but never hang on the way out."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

SIGNALS = (signal.SIGTERM, signal.SIGINT)
T = TypeVar("T")


class Stoppable(Protocol):
    @property
    def stopping(self) -> bool: ...

    def stop(self) -> None: ...


class Interrupted(Exception):
    """The work was cancelled: by a second signal, or when the grace period ran out."""


async def run_until_signalled(
    work: Coroutine[Any, Any, None],
    worker: Stoppable,
    *,
    grace_s: float,
    name: str,
    log: logging.Logger,
    second_signal: str,
) -> None:
    """Await ``work``. A first signal asks ``worker`` to stop and gives it ``grace_s``
    (a statement or server that never answers must not hold the exit forever); a
    second signal cancels it at once, after logging ``second_signal``."""
    loop = asyncio.get_running_loop()
    main = asyncio.create_task(work, name=name)

    def on_signal() -> None:
        if worker.stopping:
            log.warning("second signal: %s", second_signal)
            main.cancel()
            return
        worker.stop()
        loop.call_later(grace_s, main.cancel)

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        await main
    except asyncio.CancelledError:
        if not main.cancelled():
            raise
        raise Interrupted from None
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)


class Stopped(Exception):
    """A run was stopped by a signal, after it had stopped everything it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


async def cancel_on_signal(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; the first SIGTERM/SIGINT cancels it and raises :class:`Stopped`.

    For runs that start servers and processes (chaos, bench): cancelling runs
    their ``finally`` blocks, which stop everything they started. Signals that
    come while that cleanup runs are ignored rather than cutting it short.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.create_task(work, name="run")
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received:
            received.append(signum)
            main.cancel()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await main
    except asyncio.CancelledError:
        if received and main.cancelled():
            raise Stopped(received[0]) from None
        raise
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
