"""Fail fast: a run that acknowledges no tick for a while stops, says why, and exits 2.

chaos and bench feed ingest and wait for answers; an ingest that refuses
everything (a durability the server cannot give, a misconfiguration) must end
the run in seconds with the reason, not let it retry until someone kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

T = TypeVar("T")

STALL_AFTER_S = 10.0
"""How long a run that is sending ticks may go without one acknowledged."""

EXIT_STALLED = 2


class Stalled(Exception):
    """The run cannot make progress; the message says why (exit :data:`EXIT_STALLED`)."""


async def watch(
    last_progress: Callable[[], float],
    waiting: Callable[[], bool],
    explain: Callable[[], str],
    *,
    after_s: float = STALL_AFTER_S,
) -> None:
    """Raise :class:`Stalled` once ``waiting()`` has held with no progress for ``after_s``.

    ``last_progress`` is a ``time.monotonic()`` reading; ``explain`` says what
    the run saw instead of progress (the refusals, the ingest log).
    """
    while True:
        await asyncio.sleep(0.25)
        idle = time.monotonic() - last_progress()
        if waiting() and idle > after_s:
            raise Stalled(f"no tick acknowledged for {idle:.0f} s: {explain()}")


async def first_of(work: Awaitable[T], watchdog: Awaitable[None]) -> T:
    """``work``'s result, unless ``watchdog`` raises first (then ``work`` is cancelled)."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(watchdog)
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if not work_task.done():
            watch_task.result()  # raises Stalled
        return work_task.result()
    finally:
        for task in (work_task, watch_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


@contextlib.asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """``proc``, killed and waited for if the block ends before it exits (a cancelled run)."""
    try:
        yield proc
    finally:
        if proc.returncode is None:  # it must not outlive the run
            proc.kill()
            await proc.wait()


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a process's log, on one line."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


async def wait_ingest_ready(
    proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float = 30.0
) -> None:
    """Until ingest at ``url`` answers /readyz 200; Stalled with why if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    detail = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if proc.poll() is not None:
                raise Stalled(f"ingest exited with code {proc.returncode}: {log_tail(log_path)}")
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
                    detail = (await response.text())[:500]
            except (aiohttp.ClientError, TimeoutError) as exc:
                detail = type(exc).__name__
            if time.monotonic() > deadline:
                raise Stalled(f"ingest not ready after {timeout_s:.0f} s: {detail}")
            await asyncio.sleep(0.05)
