"""Requests in flight, for a shutdown that lets them finish."""

from __future__ import annotations

import asyncio


class InFlight:
    """Counts requests being handled, so that shutdown can wait for them.

    aiohttp's own graceful shutdown stops reading request bodies at once, which
    would cut off a feeder halfway through a POST; tickpipe stops accepting
    connections first and lets every started request finish.
    """

    def __init__(self) -> None:
        self.count = 0
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
