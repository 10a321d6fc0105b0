"""Reading committed ticks from Postgres for the query API.

Every query names one symbol and orders by ``ts``, so each one is a range scan
of the ``(symbol, ts)`` primary key or of ``md_ticks_symbol_ts_desc``, however
large the table grows (tests/ingest/test_queries.py checks the plans).

Histories and ranges leave Postgres as the JSON text of their ticks, built in
SQL and passed through as bytes: the numeric's own text is the exact decimal,
and no row becomes a Python object on the way. tests/ingest/test_history_json.py
holds the SQL to the Python encoder of single ticks (:func:`tickpipe.core.ticks.to_json`)
byte for byte.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg
import msgspec

from tickpipe.core.pgpool import close_pool, keep_session, open_pool
from tickpipe.core.ticks import EPOCH, Tick, datetime_to_us

LATEST_SQL = """
SELECT ts, price, volume, source FROM md_ticks
WHERE symbol = $1
ORDER BY ts DESC
LIMIT 1
"""

NEWEST_SQL = """
SELECT ts, price, volume, source FROM md_ticks
WHERE symbol = $1
ORDER BY ts DESC
LIMIT $2
"""

# Both bounds inclusive: ts carries microseconds at most, so "after t" is
# "from t + 1 us" and "before t" is "up to t - 1 us". One statement for every
# page keeps a single prepared plan.
BETWEEN_SQL = """
SELECT ts, price, volume, source FROM md_ticks
WHERE symbol = $1 AND ts BETWEEN $2 AND $3
ORDER BY ts
LIMIT $4
"""

# One tick as to_json() and msgspec write it: the same keys in the same order, no
# blanks, ts in RFC 3339 UTC with six fraction digits, decimals as the numeric's
# text (Postgres writes no exponent), source escaped by to_json(). The last
# parameter is the symbol's JSON text, encoded once by the caller. One concat()
# builds the row's text in one buffer, where a chain of || copies it at each step.
_TICK_JSON = """
concat(
    '{{"symbol":', ${symbol}::text,
    ',"ts":"', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    '","price":"', price::text, '","volume":"', volume::text,
    '","source":', to_json(source)::text, '}}'
)
"""


def _epoch_us(ts: str) -> str:
    """SQL: the timestamptz ``ts`` in epoch microseconds, exact on every Postgres."""
    return (
        f"extract(epoch FROM date_trunc('second', {ts}))::bigint * 1000000"
        f" + extract(microseconds FROM {ts})::bigint % 1000000"
    )


# The rows of NEWEST_SQL as one JSON text. A ts of 'infinity' (written by other
# means: no tick has one) has no RFC 3339 form and is left out.
NEWEST_JSON_SQL = f"""
SELECT convert_to(
    coalesce(string_agg({_TICK_JSON.format(symbol=3)}, ',' ORDER BY ts DESC), ''), 'UTF8'
)
FROM ({NEWEST_SQL}) newest
WHERE isfinite(ts)
"""

# The rows of BETWEEN_SQL but the last, as one JSON text; whether that last row
# was there (more follow the page), and the page's last ts (the next cursor).
BETWEEN_JSON_SQL = f"""
SELECT
    convert_to(coalesce(
        string_agg({_TICK_JSON.format(symbol=5)}, ',' ORDER BY ts) FILTER (WHERE n < $4), ''
    ), 'UTF8') AS ticks,
    count(*) >= $4 AS more,
    max({_epoch_us("ts")}) FILTER (WHERE n < $4) AS last_us
FROM (SELECT *, row_number() OVER (ORDER BY ts) AS n FROM ({BETWEEN_SQL}) rows) page
"""

_json = msgspec.json.Encoder()


class Page(NamedTuple):
    """A page of a range: its ticks as JSON text, ready to go between ``[`` and ``]``."""

    ticks: bytes
    more: bool
    """Whether ticks follow the page."""
    last_us: int | None
    """The ts of the page's last tick (None if the page is empty)."""


def _datetime(ts_us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=ts_us)


def _ticks(symbol: str, rows: Sequence[asyncpg.Record]) -> list[Tick]:
    return [
        Tick(
            symbol=symbol,
            ts_us=datetime_to_us(row["ts"]),
            price=row["price"],
            volume=row["volume"],
            source=row["source"],
        )
        for row in rows
    ]


class TickHistory:
    """Read-only queries on ``md_ticks`` through a small pool opened on first use.

    The pool holds no connection until a query needs one, so ingest starts,
    and keeps accepting ticks, while Postgres is down.
    """

    def __init__(self, database_url: str, *, max_size: int, timeout_s: float) -> None:
        self._database_url = database_url
        self._max_size = max_size
        self._timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await open_pool(
            self._database_url,
            max_size=self._max_size,
            command_timeout_s=self._timeout_s,
            connect_timeout_s=self._timeout_s,
            # Queries set nothing on the session: no reset query after each one.
            reset=keep_session,
            server_settings={
                "application_name": "tickpipe-query",
                "default_transaction_read_only": "on",
            },
        )

    async def close(self) -> None:
        if self._pool is not None:
            await close_pool(self._pool)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("TickHistory.open() was not called")
        return self._pool

    async def latest(self, symbol: str) -> Tick | None:
        """The tick of ``symbol`` with the greatest ts, or None."""
        rows = await self.pool.fetch(LATEST_SQL, symbol)
        ticks = _ticks(symbol, rows)
        return ticks[0] if ticks else None

    async def newest(self, symbol: str, limit: int) -> bytes:
        """The ``limit`` most recent ticks of ``symbol``, newest first, as JSON text."""
        ticks: bytes = await self.pool.fetchval(
            NEWEST_JSON_SQL, symbol, limit, _symbol_json(symbol)
        )
        return ticks

    async def between(self, symbol: str, first_us: int, last_us: int, limit: int) -> Page:
        """Up to ``limit`` ticks with ``first_us <= ts <= last_us``, oldest first."""
        row = await self.pool.fetchrow(
            BETWEEN_JSON_SQL,
            symbol,
            _datetime(first_us),
            _datetime(last_us),
            limit + 1,
            _symbol_json(symbol),
        )
        assert row is not None  # an aggregate: always one row
        return Page(row["ticks"], row["more"], row["last_us"])


def _symbol_json(symbol: str) -> str:
    return _json.encode(symbol).decode()
