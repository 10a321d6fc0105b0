"""One reader of a stream per process for every event-stream client (ingest/sse.py).

A hub reads its shard's stream only while some client listens and hands each entry
to the clients that asked for its symbol through a bounded queue; a client whose
queue is full is dropped (it reconnects and resumes by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import msgspec

from ingest import metrics
from tickpipe.core.backoff import Backoff
from tickpipe.core.redis_conn import FAILURES, RedisClient
from tickpipe.core.ticks import TickError, from_fields, to_json

log = logging.getLogger("tickpipe.sse")

READ_PAGE = 500
"""Entries per XREAD / XRANGE call."""
BLOCK_MS = 1000

_json = msgspec.json.Encoder()

RawEntry = tuple[bytes, dict[bytes, bytes]]


class Event(msgspec.Struct, frozen=True):
    """One tick ready to send: its stream id and its JSON text."""

    id: str
    symbol: str
    data: str


def decode_entries(entries: Iterable[RawEntry]) -> list[Event]:
    """Stream entries as events; an entry that is not a valid tick is skipped."""
    events = []
    for raw_id, fields in entries:
        entry_id = raw_id.decode()
        try:
            tick = from_fields(fields)
        except TickError as exc:
            log.debug("sse: skipping entry %s: %s", entry_id, exc)
            continue
        events.append(Event(entry_id, tick.symbol, _json.encode(to_json(tick)).decode()))
    return events


class Subscription:
    """One client's view of the hub: the symbols it wants and its bounded queue.

    ``None`` in the queue means the subscription ended (see :attr:`reason`).
    """

    def __init__(self, symbols: frozenset[str] | None, size: int) -> None:
        self.symbols = symbols
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(size + 1)
        self._size = size
        self.reason = ""

    @property
    def ended(self) -> bool:
        return bool(self.reason)

    def end(self, reason: str) -> None:
        """Stop now: what is still queued is dropped (the client resumes by id)."""
        if self.reason:
            return
        self.reason = reason
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    def offer(self, event: Event) -> None:
        if self.reason:
            return
        if self.queue.qsize() >= self._size:
            metrics.SSE_DROPPED.inc()
            self.end("too slow: the client's buffer is full")
            return
        self.queue.put_nowait(event)


class StreamHub:
    """Reads the stream once for every SSE client of this process."""

    def __init__(self, redis: RedisClient, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self._subs: set[Subscription] = set()
        self._cursor: str | None = None
        self._active = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def clients(self) -> int:
        return len(self._subs)

    async def tail(self) -> str:
        """The id of the newest entry ("0-0" when the stream is empty)."""
        newest: Any = await self._redis.xrevrange(self._stream, count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def subscribe(self, symbols: frozenset[str] | None, size: int) -> Subscription:
        """A new subscription; it receives every entry after the hub's position now."""
        if self._cursor is None:
            cursor = await self.tail()
            if self._cursor is None:  # no one else started the hub meanwhile
                self._cursor = cursor
        sub = Subscription(symbols, size)
        if self._closed:
            sub.end("server shutting down")
            return sub
        self._subs.add(sub)
        metrics.SSE_CLIENTS.set(len(self._subs))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sse-hub")
        self._active.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        metrics.SSE_CLIENTS.set(len(self._subs))

    def close(self) -> None:
        """End every subscription, and any made later (the server is stopping)."""
        self._closed = True
        for sub in list(self._subs):
            sub.end("server shutting down")

    async def stop(self) -> None:
        """Close, and stop reading the stream."""
        self.close()
        if self._task is None:
            return
        # The flag as well as the cancel: on Python 3.11 a cancel that lands as a
        # Redis reply arrives can be swallowed inside redis-py's timeouts.
        self._active.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        backoff = Backoff(base_s=0.1, cap_s=5.0)
        while not self._closed:
            await self._active.wait()
            if self._closed:
                return
            cursor = self._cursor
            assert cursor is not None
            try:
                reply: Any = await self._redis.xread(
                    {self._stream: cursor}, count=READ_PAGE, block=BLOCK_MS
                )
            except FAILURES as exc:
                delay = backoff.next_delay()
                log.warning("sse: cannot read the stream (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            entries: list[RawEntry] = reply[0][1] if reply else []
            if entries:
                self._cursor = entries[-1][0].decode()
                wanted = self._wanted()
                for event in decode_entries(
                    e for e in entries if wanted is None or e[1].get(b"symbol") in wanted
                ):
                    for sub in list(self._subs):
                        if sub.symbols is None or event.symbol in sub.symbols:
                            sub.offer(event)
            if not self._subs:
                # Nobody listens: stop reading; the next subscriber starts from the tail.
                self._cursor = None
                self._active.clear()

    def _wanted(self) -> set[bytes] | None:
        """The symbols some client wants (None: some client wants all)."""
        wanted: set[bytes] = set()
        for sub in self._subs:
            if sub.symbols is None:
                return None
            wanted.update(s.encode() for s in sub.symbols)
        return wanted


class StreamHubs:
    """One hub per shard, started only when a client listens to that shard."""

    def __init__(self, redis: RedisClient, streams: Iterable[str]) -> None:
        self.hubs = [StreamHub(redis, stream) for stream in streams]

    @property
    def clients(self) -> int:
        return sum(hub.clients for hub in self.hubs)

    def close(self) -> None:
        for hub in self.hubs:
            hub.close()

    async def stop(self) -> None:
        for hub in self.hubs:
            await hub.stop()
