"""One reader of a stream per process for every event-stream client (ingest/sse.py).

A hub reads its shard's stream only while some client listens. Each entry read
is decoded and encoded into its event frame once, whatever the number of
clients; the clients that asked for its symbol are found in a dict by symbol,
and each gets the frames of one read in one write. Delivery never waits: a
client's bytes go to its connection's buffer, and a client that lets that
buffer hold more than its share of events is dropped (it reconnects and
resumes by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import msgspec

from ingest import metrics
from tickpipe.core.backoff import Backoff
from tickpipe.core.redis_conn import FAILURES, RedisClient
from tickpipe.core.stream_ids import StreamId, parse_id
from tickpipe.core.ticks import TickError, from_fields, to_json

log = logging.getLogger("tickpipe.sse")

READ_PAGE = 500
"""Entries per XREAD / XRANGE call."""
BLOCK_MS = 1000

_json = msgspec.json.Encoder()

RawEntry = tuple[bytes, dict[bytes, bytes]]


class Event(NamedTuple):
    """One tick ready to send: its stream id, its symbol, its JSON and its whole SSE frame."""

    id: StreamId
    symbol: str
    data: bytes
    frame: bytes


def event_frame(entry_id: bytes, data: bytes) -> bytes:
    """The SSE frame of a tick event, as ``EventSourceResponse.send`` writes one."""
    return b"id: %s\r\nevent: tick\r\ndata: %s\r\n\r\n" % (entry_id, data)


def decode_entries(entries: Iterable[RawEntry]) -> list[Event]:
    """Stream entries as events; an entry that is not a valid tick is skipped."""
    events = []
    for raw_id, fields in entries:
        try:
            tick = from_fields(fields)
        except TickError as exc:
            log.debug("sse: skipping entry %s: %s", raw_id.decode(), exc)
            continue
        data = _json.encode(to_json(tick))
        events.append(
            Event(parse_id(raw_id.decode()), tick.symbol, data, event_frame(raw_id, data))
        )
    return events


Write = Callable[[bytes], int | None]
"""Puts bytes on a client's connection now, without waiting: how many bytes went on the
connection, or None when it is closed (the client is gone)."""
Buffered = Callable[[], int]
"""How many bytes a client's connection holds that the client has not taken yet."""


class Subscription:
    """One client's place in the hub: the symbols it wants and how its events reach it.

    A new subscription holds what the hub delivers until :meth:`go_live` (the
    client is still catching up from the stream); from then on, delivered
    events are written at once, those the catch-up sent already left out.
    """

    def __init__(
        self, symbols: frozenset[str] | None, size: int, write: Write, buffered: Buffered
    ) -> None:
        self.symbols = symbols
        self._size = size
        self._write = write
        self._buffered = buffered
        self._held: list[Event] | None = []
        self._sent: StreamId = (0, 0)
        self._written = 0
        """Bytes this subscription has put on the connection."""
        self._unread: deque[tuple[int, int]] = deque()
        """(offset of its end, events) of each write the connection may still hold."""
        self._pending = 0
        """Events in those writes."""
        self.reason = ""
        self._ended = asyncio.Event()

    @property
    def ended(self) -> bool:
        return bool(self.reason)

    async def wait_ended(self) -> str:
        """Why the subscription ended, once it has."""
        await self._ended.wait()
        return self.reason

    def end(self, reason: str) -> None:
        """Stop now: nothing more is written (the client resumes by id)."""
        if self.reason:
            return
        self.reason = reason
        self._held = None
        self._ended.set()

    def go_live(self, sent: StreamId) -> None:
        """The client has every event up to ``sent``: write what was held, then write at once."""
        held, self._held = self._held, None
        self._sent = sent
        if held:
            self.deliver(held)

    def deliver(self, events: list[Event]) -> None:
        """Events of one hub read, in stream order, for this client: one write."""
        if self.reason:
            return
        if self._held is not None:
            self._held.extend(events)
            if len(self._held) > self._size:
                self._drop()
            return
        if events[0].id <= self._sent:
            events = [event for event in events if event.id > self._sent]
            if not events:
                return
        # Events the client has not taken yet: those of the writes whose bytes are still in
        # its connection's buffer (the kernel's socket buffer, before it, is taken).
        taken_to = self._written - self._buffered()
        unread = self._unread
        while unread and unread[0][0] <= taken_to:
            self._pending -= unread.popleft()[1]
        if self._pending + len(events) > self._size:
            self._drop()
            return
        written = self._write(
            events[0].frame if len(events) == 1 else b"".join(e.frame for e in events)
        )
        if written is None:
            self.end("client gone")
            return
        self._written += written
        unread.append((self._written, len(events)))
        self._pending += len(events)
        self._sent = events[-1].id

    def _drop(self) -> None:
        metrics.SSE_DROPPED.inc()
        self.end("too slow: the client's buffer is full")


class StreamHub:
    """Reads the stream once for every SSE client of this process."""

    def __init__(self, redis: RedisClient, stream: str, batch_s: float = 0.0) -> None:
        self._redis = redis
        self._stream = stream
        self._batch_s = batch_s
        self._subs: set[Subscription] = set()
        self._by_symbol: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()
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

    async def subscribe(
        self, symbols: frozenset[str] | None, size: int, write: Write, buffered: Buffered
    ) -> Subscription:
        """A new subscription; it receives every entry after the hub's position now."""
        if self._cursor is None:
            cursor = await self.tail()
            if self._cursor is None:  # no one else started the hub meanwhile
                self._cursor = cursor
        sub = Subscription(symbols, size, write, buffered)
        if self._closed:
            sub.end("server shutting down")
            return sub
        self._subs.add(sub)
        if symbols is None:
            self._everything.add(sub)
        else:
            for symbol in symbols:
                self._by_symbol.setdefault(symbol, set()).add(sub)
        metrics.SSE_CLIENTS.set(len(self._subs))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sse-hub")
            self._task.add_done_callback(_report_end)
        self._active.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        self._everything.discard(sub)
        for symbol in sub.symbols or ():
            subs = self._by_symbol[symbol]
            subs.discard(sub)
            if not subs:
                del self._by_symbol[symbol]
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
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._active.wait()
            if self._closed:
                return
            cursor = self._cursor
            assert cursor is not None
            started = loop.time()
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
                self._dispatch(entries)
                # Ticks flow: let the next ones gather, so a read (and a client's
                # write) carries many events, not one each.
                rest = self._batch_s - (loop.time() - started)
                if rest > 0 and len(entries) < READ_PAGE:
                    await asyncio.sleep(rest)
            if not self._subs:
                # Nobody listens: stop reading; the next subscriber starts from the tail.
                self._cursor = None
                self._active.clear()

    def _dispatch(self, entries: list[RawEntry]) -> None:
        """Decode the entries some client wants, once, and give each client its share."""
        by_symbol = self._by_symbol
        if not self._everything:
            entries = [
                e for e in entries if e[1].get(b"symbol", b"").decode(errors="replace") in by_symbol
            ]
        events = decode_entries(entries)
        if not events:
            return
        for sub in self._everything:
            _deliver(sub, events)
        shares: dict[Subscription, list[Event]] = {}
        for event in events:
            for sub in by_symbol.get(event.symbol, ()):
                share = shares.get(sub)
                if share is None:
                    shares[sub] = [event]
                else:
                    share.append(event)
        for sub, share in shares.items():
            _deliver(sub, share)


def _deliver(sub: Subscription, events: list[Event]) -> None:
    """One client's share; a failure ends that client's stream, never the hub."""
    try:
        sub.deliver(events)
    except Exception:
        log.exception("sse: ending a client's stream after a failed write")
        sub.end("server error")


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sse: the stream reader stopped", exc_info=task.exception())


class StreamHubs:
    """One hub per shard, started only when a client listens to that shard."""

    def __init__(self, redis: RedisClient, streams: Iterable[str], batch_s: float = 0.0) -> None:
        self.hubs = [StreamHub(redis, stream, batch_s) for stream in streams]

    @property
    def clients(self) -> int:
        return sum(hub.clients for hub in self.hubs)

    def close(self) -> None:
        for hub in self.hubs:
            hub.close()

    async def stop(self) -> None:
        for hub in self.hubs:
            await hub.stop()
