"""Realtime push: ``GET /ticks/stream?symbols=A,B`` as Server-Sent Events.

How and why: docs/architecture.md, "Realtime push (ingest/sse.py, ingest/hubs.py)".
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import msgspec
from aiohttp import hdrs, web
from aiohttp_sse import EventSourceResponse, sse_response
from redis.exceptions import RedisError

from ingest.appkeys import LINK
from ingest.errors import ApiError
from ingest.hubs import READ_PAGE, Event, StreamHub, Write, decode_entries
from ingest.params import authenticate_read, check_known, small_uint
from tickpipe.core import redis_conn
from tickpipe.core.redis_conn import FAILURES, RedisClient
from tickpipe.core.shards import ShardMap
from tickpipe.core.stream_ids import StreamId, parse_id
from tickpipe.core.ticks import SYMBOL

log = logging.getLogger("tickpipe.sse")

_json = msgspec.json.Encoder()

MAX_SYMBOLS = 100
LAST_EVENT_ID_PATTERN = r"^([0-9]{1,19}-[0-9]{1,19})?$"
"""Last-Event-ID as the OpenAPI document states it: a stream id (each part below 2**64,
as every id this endpoint sends), or empty for none."""
_LAST_EVENT_ID = re.compile(LAST_EVENT_ID_PATTERN)  # used with fullmatch: no "\n" after "$"


async def end_streams(app: web.Application) -> None:
    """on_shutdown: event streams never finish by themselves, so end them."""
    if LINK in app:
        app[LINK].close_streams()


# -- the endpoint -----------------------------------------------------------------------


def parse_symbols(raw: str | None) -> frozenset[str] | None:
    if raw is None:
        return None
    # As documented: exactly the symbols between the commas (no blanks around them, no
    # empty item), counted as given.
    named = raw.split(",")
    if raw == "" or len(named) > MAX_SYMBOLS:
        raise ApiError(
            422,
            "invalid_parameter",
            f"symbols must name 1 to {MAX_SYMBOLS} symbols separated by commas",
            field="symbols",
        )
    for symbol in named:
        if SYMBOL.fullmatch(symbol) is None:
            raise ApiError(
                422,
                "invalid_parameter",
                f"symbols: {symbol!r} is not a valid symbol",
                field="symbols",
            )
    return frozenset(named)


def choose_shard(shards: ShardMap, symbols: frozenset[str] | None, raw_shard: str | None) -> int:
    """The one shard an event stream follows (see the module docstring)."""
    if raw_shard is not None:
        shard = small_uint(raw_shard)
        if shard is None or shard >= shards.count:
            raise ApiError(
                422,
                "invalid_parameter",
                f"shard must be 0 to {shards.count - 1} (STREAM_SHARDS={shards.count})",
                field="shard",
            )
        chosen = shard
    elif symbols is not None:
        chosen = shards.for_symbol(next(iter(symbols))).index
    elif shards.count == 1:
        return 0
    else:
        raise ApiError(
            422,
            "invalid_parameter",
            f"the ticks are spread over {shards.count} shards, each resumable on its own:"
            f" name symbols of one shard, or shard=0 to {shards.count - 1}",
            field="symbols",
        )
    placed = {symbol: shards.for_symbol(symbol).index for symbol in sorted(symbols or ())}
    if any(index != chosen for index in placed.values()):
        where = ", ".join(f"{symbol}: shard {index}" for symbol, index in placed.items())
        raise ApiError(
            422,
            "invalid_parameter",
            f"these symbols are on different shards ({where}): open one event stream per shard",
            field="symbols",
        )
    return chosen


def parse_last_event_id(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if _LAST_EVENT_ID.fullmatch(raw) is None:
        # Not parse_id's isdigit(): it takes "²", and ids past 2**64 that Redis refuses.
        raise ApiError(
            422,
            "invalid_parameter",
            "Last-Event-ID must be the id of an event this endpoint sent (<ms>-<seq>)",
            field="Last-Event-ID",
        )
    return raw


async def stream_ticks(request: web.Request) -> web.StreamResponse:
    """GET /ticks/stream: ticks as Server-Sent Events, resumable with Last-Event-ID."""
    authenticate_read(request)
    check_known(request.query, "symbols", "shard")
    symbols = parse_symbols(request.query.get("symbols"))
    resume_from = parse_last_event_id(request.headers.get("Last-Event-ID"))
    linked = request.app[LINK].get()
    settings = linked.settings
    shard = settings.shard_map.shards[
        choose_shard(settings.shard_map, symbols, request.query.get("shard"))
    ]
    hubs = linked.hubs
    hub = hubs.hubs[shard.index]
    if hubs.clients >= settings.sse_max_clients:
        raise ApiError(
            503,
            "too_many_clients",
            f"this process serves {settings.sse_max_clients} event streams already; retry later",
            headers={"Retry-After": "5"},
        )
    redis = linked.redis
    try:
        cursor = resume_from or await hub.tail()
        gap = await trimmed_after(redis, shard.stream, resume_from)
    except FAILURES as exc:
        raise ApiError(
            503,
            "redis_unavailable",
            f"the tick stream (Redis) is unavailable ({exc}); retry later",
            headers={"Retry-After": "1"},
        ) from None
    client = _Client(request, redis, shard.stream, symbols, settings.sse_send_timeout_s)
    async with sse_response(
        request,
        ping_interval=settings.sse_heartbeat_s,
        send_timeout=settings.sse_send_timeout_s,
    ) as response:
        client.response = response
        try:
            if gap is not None:
                await response.send(_json.encode(gap).decode(), event="gap")
            reason = await client.run(
                hub, cursor, settings.sse_client_buffer, settings.sse_heartbeat_s
            )
        except (ConnectionResetError, TimeoutError, RuntimeError) as exc:
            reason = f"client gone ({type(exc).__name__})"
        except FAILURES as exc:
            reason = f"redis unavailable: {exc}"
        log.debug("sse client %s ended: %s", request.remote, reason)
    return response


async def trimmed_after(
    redis: RedisClient, stream: str, resume_from: str | None
) -> dict[str, str] | None:
    """Whether entries after ``resume_from`` may have been trimmed away; None if not.

    Trimming removes the oldest entries, so the client's position being older
    than the first entry left means what followed it is gone too (unless the
    first entry left is its direct successor, which the stream cannot tell).
    """
    if resume_from is None:
        return None
    try:
        info = await redis.xinfo_stream(stream)
    except RedisError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    position = parse_id(resume_from)
    first = info.get("first-entry")
    first_id = redis_conn.text(first[0]) if first else None
    last_id = redis_conn.text(info["last-generated-id"])
    deleted_id = redis_conn.text(info.get("max-deleted-entry-id") or "0-0")
    # entries-added (Redis 7+) tells whether anything was ever removed; without it,
    # assume so: a needless 'gap' event costs a history reload, a missed one a hole.
    removed = info.get("entries-added", info["length"] + 1) > info["length"]
    trimmed = removed and parse_id(first_id or last_id) > position
    if not trimmed and parse_id(deleted_id) <= position:
        return None
    return {
        "after": resume_from,
        "resumes_at": first_id or "",
        "detail": "entries after Last-Event-ID may have been trimmed from the stream;"
        " reload history from GET /ticks/{symbol}?from=...",
    }


class _Client:
    """One event-stream response: catch-up from the stream, then live events from the hub."""

    def __init__(
        self,
        request: web.Request,
        redis: RedisClient,
        stream: str,
        symbols: frozenset[str] | None,
        send_timeout_s: float,
    ) -> None:
        self._request = request
        self._redis = redis
        self._stream = stream
        self._symbols = symbols
        self._send_timeout_s = send_timeout_s
        self.response: EventSourceResponse | None = None
        self._sent: StreamId = (0, 0)

    async def _send(self, events: list[Event]) -> None:
        """Catch-up: the frames of one page in one write, waiting for a slow client."""
        assert self.response is not None
        if not events:
            return
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await self.response.write(b"".join(event.frame for event in events))
        except TimeoutError:
            if (transport := self._request.transport) is not None:
                transport.abort()  # a stalled client would hold the end of the response too
            raise
        self._sent = events[-1].id

    async def _catch_up(self, cursor: str) -> str:
        """Send every entry after ``cursor`` that exists now; the new cursor."""
        while True:
            entries: Any = await self._redis.xrange(self._stream, min=f"({cursor}", count=READ_PAGE)
            if not entries:
                return cursor
            cursor = entries[-1][0].decode()
            await self._send(
                [
                    event
                    for event in decode_entries(entries)
                    if self._symbols is None or event.symbol in self._symbols
                    if event.id > self._sent
                ]
            )
            if len(entries) < READ_PAGE:
                return cursor

    async def run(self, hub: StreamHub, cursor: str, buffer: int, idle_s: float) -> str:
        """Stream until the client leaves, is too slow, or the server stops; why it ended."""
        response = self.response
        assert response is not None
        self._sent = parse_id(cursor)
        cursor = await self._catch_up(cursor)
        await response.write(b"")  # the headers go out before any direct write
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return "client gone"
        sub = await hub.subscribe(
            self._symbols,
            buffer,
            _chunk_writer(transport, response),
            transport.get_write_buffer_size,
        )
        try:
            await self._catch_up(cursor)
            sub.go_live(self._sent)
            while not sub.ended:
                try:
                    async with asyncio.timeout(idle_s):
                        await sub.wait_ended()
                except TimeoutError:
                    # Idle: the heartbeat task notices a client that went away.
                    if not response.is_connected() or transport.is_closing():
                        sub.end("client gone")
            if transport.get_write_buffer_size():
                # Too slow, or gone: ending the response gracefully would wait for it.
                # What its connection holds is lost to it: it resumes by id.
                transport.abort()
            return sub.reason
        finally:
            hub.unsubscribe(sub)


def _chunk_writer(transport: asyncio.Transport, response: web.StreamResponse) -> Write:
    """Writes to an event stream's connection now, as the response's own writer would.

    The hub must never wait for a client, and the response's ``write`` may (it
    drains a full buffer); so the hub's writes go to the transport directly, each
    one whole HTTP/1.1 chunk (or plain bytes to an HTTP/1.0 client), between
    whole chunks of the response's own writes (heartbeats), never inside one.
    """
    chunked = response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"

    def write(payload: bytes) -> int | None:
        if transport.is_closing():
            return None  # the client is gone
        if not chunked:
            transport.write(payload)
            return len(payload)
        head = b"%x\r\n" % len(payload)
        transport.writelines((head, payload, b"\r\n"))
        return len(head) + len(payload) + 2

    return write
