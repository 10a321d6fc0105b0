"""Reading committed ticks from Postgres for the query API.

Every query names one symbol and orders by ``ts``, so each one is a range scan
of the ``(symbol, ts)`` primary key or of ``md_ticks_symbol_ts_desc``, however
large the table grows (tests/ingest/test_queries.py checks the plans).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import asyncpg

from tickpipe.core.pgpool import close_pool, open_pool
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

    async def newest(self, symbol: str, limit: int) -> list[Tick]:
        """The ``limit`` most recent ticks of ``symbol``, newest first."""
        return _ticks(symbol, await self.pool.fetch(NEWEST_SQL, symbol, limit))

    async def between(self, symbol: str, first_us: int, last_us: int, limit: int) -> list[Tick]:
        """Up to ``limit`` ticks with ``first_us <= ts <= last_us``, oldest first."""
        rows = await self.pool.fetch(
            BETWEEN_SQL, symbol, _datetime(first_us), _datetime(last_us), limit
        )
        return _ticks(symbol, rows)
