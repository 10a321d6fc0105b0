"""Fault injection for crash tests: TICKPIPE_FAULT=point[:action].

The flusher passes named points on its way through a batch; a test that sets
``TICKPIPE_FAULT=after_commit`` makes the process SIGKILL itself right after a
COMMIT and before the XACK, exactly, instead of hoping a timed kill lands there.
Actions: ``kill`` (default, SIGKILL) or ``sleep=SECONDS``. Off unless set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger("tickpipe.flusher")

POINTS = ("after_read", "before_commit", "after_commit", "after_ack")


class Faults:
    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.action = "kill"
        if spec:
            point, _, action = spec.partition(":")
            if point not in POINTS:
                raise ValueError(f"TICKPIPE_FAULT: unknown point {point!r}; one of {POINTS}")
            self.point = point
            self.action = action or "kill"

    async def hit(self, point: str) -> None:
        if point != self.point:
            return
        if self.action.startswith("sleep="):
            seconds = float(self.action.removeprefix("sleep="))
            log.warning("fault injection: sleeping %.1fs at %s", seconds, point)
            await asyncio.sleep(seconds)
            return
        log.warning("fault injection: SIGKILL at %s", point)
        os.kill(os.getpid(), signal.SIGKILL)
