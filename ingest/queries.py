"""The read API: the latest tick, recent history and time ranges of one symbol.

    GET /ticks/{symbol}/latest            the newest tick (Redis, else Postgres)
    GET /ticks/{symbol}?limit=N           the N newest committed ticks, newest first
    GET /ticks/{symbol}?from=T&to=T       committed ticks in [from, to), oldest first,
                                          pages of `limit` linked by a cursor

Readers authenticate with any ingest token or read-only token (READ_TOKENS).
Prices and volumes are strings holding the exact decimal; ``ts`` is RFC 3339 UTC.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from ingest.appkeys import LINK, SETTINGS, STORE
from ingest.errors import ApiError, json_response
from ingest.history import TickHistory
from ingest.params import authenticate_read, check_known, path_symbol, small_uint
from tickpipe.core.latest_price import decode_latest
from tickpipe.core.pgerrors import is_transient
from tickpipe.core.redis_conn import FAILURES, RedisClient
from tickpipe.core.ticks import MAX_TS_US, Tick, TickError, parse_ts, to_json

_json = msgspec.json.Encoder()

log = logging.getLogger("tickpipe.ingest")

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


def parse_limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    limit = small_uint(raw)
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        raise ApiError(
            422,
            "invalid_parameter",
            f"limit must be an integer from 1 to {MAX_LIMIT}, not {raw!r}",
            field="limit",
        )
    return limit


def parse_time(query: Mapping[str, str], name: str) -> int | None:
    """A time parameter (RFC 3339 with offset, or epoch milliseconds) in epoch microseconds."""
    raw = query.get(name)
    if raw is None:
        return None
    epoch_ms = small_uint(raw)
    try:
        return parse_ts(raw if epoch_ms is None else epoch_ms)
    except TickError as exc:
        raise ApiError(
            422, "invalid_parameter", f"{name}: {exc.detail.replace('ts ', '', 1)}", field=name
        ) from None


# A cursor is opaque to clients; it holds the ts of the last tick of the page.
_CURSOR_PREFIX = "t1:"


def encode_cursor(ts_us: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{ts_us}".encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> int:
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    ts_us = small_uint(text.removeprefix(_CURSOR_PREFIX))
    if not text.startswith(_CURSOR_PREFIX) or ts_us is None or ts_us > MAX_TS_US:
        raise ApiError(
            422,
            "invalid_parameter",
            "cursor is not one this API returned (use next_cursor from the previous page)",
            field="cursor",
        )
    return ts_us


@contextlib.contextmanager
def store_unavailable_as_503(what: str) -> Iterator[None]:
    """An unreachable (or overloaded) Postgres becomes 503 with Retry-After."""
    try:
        yield
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("%s: postgres unavailable: %s: %s", what, type(exc).__name__, exc)
        raise ApiError(
            503,
            "store_unavailable",
            "the tick store (Postgres) is unavailable or too slow; retry later",
            headers={"Retry-After": "1"},
        ) from None


# -- handlers ---------------------------------------------------------------------------


async def get_latest(request: web.Request) -> web.Response:
    """GET /ticks/{symbol}/latest: the newest accepted tick, from Redis, else Postgres."""
    authenticate_read(request)
    symbol = path_symbol(request)
    check_known(request.query)
    tick = None
    linked = request.app[LINK].linked
    if linked is not None:  # else Redis has not answered yet: Postgres answers alone
        # The symbol's shard holds its latest price (the same hash when there is one shard).
        latest_key = linked.settings.shard_map.for_symbol(symbol).latest
        tick = await latest_from_redis(linked.redis, latest_key, symbol)
    origin = "stream"
    if tick is None:
        with store_unavailable_as_503("latest"):
            tick = await request.app[STORE].latest(symbol)
        origin = "store"
    if tick is None:
        raise ApiError(404, "not_found", f"no tick of {symbol!r} has been stored", field="symbol")
    return json_response({**to_json(tick), "origin": origin})


async def latest_from_redis(redis: RedisClient, key: str, symbol: str) -> Tick | None:
    """The symbol's entry in the latest-price hash (written with every XADD), or None."""
    try:
        raw = await redis.hget(key, symbol)
    except FAILURES as exc:
        log.warning("latest %s: redis unavailable (%s); answering from Postgres", symbol, exc)
        return None
    if raw is None:
        return None
    return decode_latest(symbol, raw)


async def get_ticks(request: web.Request) -> web.Response:
    """GET /ticks/{symbol}: recent history (limit) or a time range (from/to, cursor)."""
    authenticate_read(request)
    symbol = path_symbol(request)
    query = request.query
    check_known(query, "limit", "from", "to", "cursor")
    limit = parse_limit(query)
    start_us, end_us = parse_time(query, "from"), parse_time(query, "to")
    if start_us is None and end_us is None:
        if "cursor" in query:
            raise ApiError(
                422, "invalid_parameter", "cursor only pages a from/to range", field="cursor"
            )
        with store_unavailable_as_503("history"):
            newest = await request.app[STORE].newest(symbol, limit)
        return page_response({"symbol": symbol, "order": "newest_first"}, newest)

    first_us = 0 if start_us is None else start_us
    last_us = MAX_TS_US if end_us is None else end_us - 1
    if end_us is not None and start_us is not None and end_us <= start_us:
        raise ApiError(422, "invalid_parameter", "to must be later than from", field="to")
    if "cursor" in query:
        first_us = max(first_us, decode_cursor(query["cursor"]) + 1)
    with store_unavailable_as_503("range"):
        found = await request.app[STORE].between(symbol, first_us, last_us, limit)
    links: dict[str, str | None] = {"next_cursor": None, "next": None}
    if found.more and found.last_us is not None:
        cursor = encode_cursor(found.last_us)
        params = {k: v for k, v in query.items() if k != "cursor"}
        links["next_cursor"] = cursor
        links["next"] = f"{request.path}?{urlencode({**params, 'cursor': cursor})}"
    return page_response({"symbol": symbol, "order": "oldest_first"}, found.ticks, links)


def page_response(
    head: dict[str, str], ticks: bytes, tail: dict[str, str | None] | None = None
) -> web.Response:
    """``{**head, "ticks": [...], **tail}``, the ticks spliced in as Postgres wrote them."""
    body = b"".join(
        (
            _json.encode(head)[:-1],
            b',"ticks":[',
            ticks,
            b"]",
            b"}" if tail is None else b"," + _json.encode(tail)[1:],
        )
    )
    return web.Response(body=body, content_type="application/json")


# -- resources --------------------------------------------------------------------------


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The read-only Postgres pool (no connection until the first query)."""
    settings = app[SETTINGS]
    store = TickHistory(
        settings.database_url,
        max_size=settings.query_pool_size,
        timeout_s=settings.query_timeout_s,
    )
    await store.open()
    app[STORE] = store
    yield
    await store.close()
