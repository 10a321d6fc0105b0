"""GET /ranges/{symbol}?at=T: the rolled-up windows (md_ranges) that contain time T.

One window per width the rollup worker computes, narrowest first; decimals as
strings, like every read route. Nothing rolled up at T is an empty list, not an
error; a database without rollups (`tickpipe schema apply --rollups`) is 404.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
from aiohttp import web

from ingest.appkeys import STORE
from ingest.errors import ApiError, json_response
from ingest.params import authenticate_read, check_known, path_symbol
from ingest.queries import parse_time, store_unavailable_as_503
from tickpipe.core.md_ranges import covering
from tickpipe.core.ticks import EPOCH, format_ts


async def get_ranges(request: web.Request) -> web.Response:
    """GET /ranges/{symbol}?at=T (RFC 3339 or epoch milliseconds)."""
    authenticate_read(request)
    symbol = path_symbol(request)
    check_known(request.query, "at")
    at_us = parse_time(request.query, "at")
    if at_us is None:
        raise ApiError(
            422,
            "invalid_parameter",
            "at is required: a time as RFC 3339 with an offset or epoch milliseconds",
            field="at",
        )
    at = EPOCH + dt.timedelta(microseconds=at_us)
    try:
        with store_unavailable_as_503("ranges"):
            ranges = await covering(request.app[STORE].pool, symbol, at)
    except asyncpg.UndefinedTableError:
        raise ApiError(
            404,
            "rollups_disabled",
            "this database has no rollups: `tickpipe schema apply --rollups`, then run"
            " `tickpipe rollup`",
        ) from None
    return json_response(
        {"symbol": symbol, "at": format_ts(at_us), "ranges": [r.to_json() for r in ranges]}
    )
