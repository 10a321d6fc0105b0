"""Reading md_ranges: "which aggregates cover time T", one per stored width."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

import asyncpg

from tickpipe.core.settings import format_width
from tickpipe.core.ticks import datetime_to_us, format_ts

# "window" @> T with symbol = $1 is what the GiST index on (symbol, "window")
# answers; the planner does pick it over the primary key's btree, which could
# only narrow by symbol (tests/tickpipe/rollup/test_rollup.py checks the plan).
COVERING_SQL = """
SELECT lower("window") AS window_start, upper("window") AS window_end,
       (agg->>'open')::numeric AS open, (agg->>'high')::numeric AS high,
       (agg->>'low')::numeric AS low, (agg->>'close')::numeric AS close,
       (agg->>'volume')::numeric AS volume, (agg->>'count')::bigint AS count
FROM md_ranges
WHERE symbol = $1 AND "window" @> $2::timestamptz
ORDER BY upper("window") - lower("window")
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """One rolled-up window of one symbol: OHLCV over ``[start, end)``, exact decimals."""

    symbol: str
    start: dt.datetime
    end: dt.datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    count: int

    @property
    def width_s(self) -> int:
        return int((self.end - self.start).total_seconds())

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict; decimals as strings, so no reader rounds them through a float."""
        return {
            "width": format_width(self.width_s),
            "start": format_ts(datetime_to_us(self.start)),
            "end": format_ts(datetime_to_us(self.end)),
            "open": format(self.open, "f"),
            "high": format(self.high, "f"),
            "low": format(self.low, "f"),
            "close": format(self.close, "f"),
            "volume": format(self.volume, "f"),
            "count": self.count,
        }


async def covering(
    db: asyncpg.Connection | asyncpg.Pool, symbol: str, at: dt.datetime
) -> list[Range]:
    """The windows of ``symbol`` that contain ``at``, narrowest first (one per width)."""
    rows = await db.fetch(COVERING_SQL, symbol, at)
    return [
        Range(
            symbol=symbol,
            start=row["window_start"],
            end=row["window_end"],
            open=row["open"],
            high=row["high"],
            low=row["low"],
            close=row["close"],
            volume=row["volume"],
            count=row["count"],
        )
        for row in rows
    ]
