"""The rollup worker's Postgres side: lock symbols, claim their marks, recompute, upsert.

One pass is one transaction (READ COMMITTED): try
``pg_try_advisory_xact_lock(hashtext(symbol))`` on up to N symbols with queued
marks, oldest marks first, skipping symbols another worker holds; claim up to M
marks of the locked symbols with ``FOR UPDATE SKIP LOCKED``; recompute every
window of every width that holds a marked second, exactly, from md_ticks;
upsert md_ranges; delete the claimed marks; COMMIT. A pass never waits for a
symbol and never holds more than N advisory locks. Why no tick can be missed:
docs/rollups.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tickpipe.core.errors import FatalError, TransientError
from tickpipe.core.pgerrors import is_transient
from tickpipe.core.pgpool import close_pool, open_pool
from tickpipe.core.settings import ROLLUP_MAX_SYMBOLS_PER_PASS

# Up to $3 symbols among the oldest $2 marks of symbols not tried yet ($1), oldest
# first, and a try of each one's lock: never a wait, so passes never queue behind
# each other or deadlock. The LIMITs sit in the subquery on purpose: the outer
# select list (the lock function) runs once per row the subquery returns and on
# no other, so a pass holds at most the locks it asked for.
LOCK_SYMBOLS_SQL = """
SELECT symbol, pg_try_advisory_xact_lock(hashtext(symbol)) AS locked
FROM (
    SELECT symbol
    FROM (
        SELECT id, symbol FROM md_ranges_dirty
        WHERE symbol <> ALL($1::text[]) ORDER BY id LIMIT $2
    ) AS oldest
    GROUP BY symbol ORDER BY min(id) LIMIT $3
) AS candidates
"""

# After the locks: nobody else processes these symbols now, and every mark an
# earlier holder deleted is gone from this statement's snapshot. SKIP LOCKED
# only matters for marks another transaction holds (an operator's, or a worker
# of an earlier version mid-upgrade).
CLAIM_SQL = """
SELECT id, symbol, second_ts FROM md_ranges_dirty
WHERE symbol = ANY($1::text[]) ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
"""

# Runs after the claim, under the symbol locks: its snapshot contains every tick
# whose mark was claimed, and every write of an earlier holder of those locks. One
# statement, one snapshot: the upsert and the delete of emptied windows agree.
# Windows are aligned on the Unix epoch; a window with no ticks left (an UPDATE
# moved them) loses its row. LATERAL makes each window one range scan of the
# primary key: as a plain join, the planner (which cannot estimate the unnest)
# merge-joined on symbol alone and filtered ts afterwards, quadratic in the
# ticks of a symbol.
RECOMPUTE_SQL = """
WITH windows AS MATERIALIZED (
    SELECT DISTINCT m.symbol,
        date_bin(w.width_s * interval '1 second', m.second_ts, timestamptz 'epoch') AS lo,
        w.width_s
    FROM unnest($1::text[], $2::timestamptz[]) AS m(symbol, second_ts)
    CROSS JOIN unnest($3::bigint[]) AS w(width_s)
),
bounds AS MATERIALIZED (
    SELECT symbol, lo, lo + width_s * interval '1 second' AS hi,
        tstzrange(lo, lo + width_s * interval '1 second', '[)') AS win
    FROM windows
),
folded AS (
    SELECT b.symbol, b.win, f.prices, f.high, f.low, f.volume, f.n
    FROM bounds b
    CROSS JOIN LATERAL (
        SELECT array_agg(t.price ORDER BY t.ts) AS prices, max(t.price) AS high,
            min(t.price) AS low, sum(t.volume) AS volume, count(*) AS n
        FROM md_ticks t
        WHERE t.symbol = b.symbol AND t.ts >= b.lo AND t.ts < b.hi
    ) AS f
    WHERE f.n > 0
),
written AS (
    INSERT INTO md_ranges (symbol, "window", agg)
    SELECT symbol, win, jsonb_build_object(
        'open', prices[1]::text, 'high', high::text, 'low', low::text,
        'close', prices[cardinality(prices)]::text, 'volume', volume::text, 'count', n)
    FROM folded
    ON CONFLICT (symbol, "window") DO UPDATE SET agg = EXCLUDED.agg
    WHERE md_ranges.agg IS DISTINCT FROM EXCLUDED.agg
    RETURNING 1
),
emptied AS (
    DELETE FROM md_ranges r USING bounds b
    WHERE r.symbol = b.symbol AND r."window" = b.win
      AND NOT EXISTS (SELECT 1 FROM folded f WHERE f.symbol = b.symbol AND f.win = b.win)
    RETURNING 1
)
SELECT (SELECT count(*) FROM bounds) AS windows,
       (SELECT count(*) FROM written) AS changed,
       (SELECT count(*) FROM emptied) AS emptied
"""

DELETE_MARKS_SQL = "DELETE FROM md_ranges_dirty WHERE id = ANY($1::bigint[])"

# A loose index scan: one index probe per distinct symbol, not a scan of md_ticks.
SYMBOLS_SQL = """
WITH RECURSIVE s AS (
    (SELECT symbol FROM md_ticks ORDER BY symbol LIMIT 1)
    UNION ALL
    SELECT (SELECT symbol FROM md_ticks WHERE symbol > s.symbol ORDER BY symbol LIMIT 1)
    FROM s WHERE s.symbol IS NOT NULL
)
SELECT symbol FROM s WHERE symbol IS NOT NULL
"""

BACKFILL_SQL = """
INSERT INTO md_ranges_dirty (symbol, second_ts)
SELECT DISTINCT symbol, date_bin('1 second', ts, timestamptz 'epoch')
FROM md_ticks
WHERE symbol = $1
  AND ts >= coalesce($2::timestamptz, '-infinity') AND ts < coalesce($3::timestamptz, 'infinity')
"""


@dataclasses.dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass (one transaction) did."""

    marks: int = 0
    symbols: int = 0
    """Symbols locked (at most the pass's max_symbols): one advisory lock each."""
    busy: int = 0
    """Symbols with queued marks skipped because another worker held their lock."""
    windows: int = 0
    """Windows recomputed (every width of every marked second)."""
    changed: int = 0
    """md_ranges rows inserted or updated (a recomputed window may be unchanged)."""
    emptied: int = 0
    """md_ranges rows deleted: their window no longer holds any tick."""


class RollupStore:
    """md_ranges and its queue of marks, in one pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, database_url: str, *, max_size: int = 2) -> RollupStore:
        return cls(await open_pool(database_url, max_size=max_size))

    async def close(self, timeout_s: float = 2.0) -> None:
        await close_pool(self._pool, timeout_s)

    async def merge_pass(
        self,
        limit: int,
        widths_s: Sequence[int],
        *,
        max_symbols: int = ROLLUP_MAX_SYMBOLS_PER_PASS,
    ) -> PassResult:
        """Roll up at most ``limit`` marks of at most ``max_symbols`` symbols, in one transaction.

        Symbols another worker holds are skipped, never waited for; their marks stay queued.
        """
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                symbols, busy = await _lock_symbols(conn, limit, max_symbols)
                if not symbols:
                    return PassResult(busy=busy)
                marks = await conn.fetch(CLAIM_SQL, symbols, limit)
                if not marks:  # another worker took them between our look and our lock
                    return PassResult(symbols=len(symbols), busy=busy)
                seconds = sorted({(m["symbol"], m["second_ts"]) for m in marks})
                counts = await conn.fetchrow(
                    RECOMPUTE_SQL,
                    [symbol for symbol, _ in seconds],
                    [second for _, second in seconds],
                    list(widths_s),
                )
                await conn.execute(DELETE_MARKS_SQL, [m["id"] for m in marks])
        except Exception as exc:
            raise classify(exc) from exc
        assert counts is not None
        return PassResult(
            marks=len(marks),
            symbols=len(symbols),
            busy=busy,
            windows=counts["windows"],
            changed=counts["changed"],
            emptied=counts["emptied"],
        )

    async def symbols(self) -> list[str]:
        """Every symbol in md_ticks."""
        try:
            return [row["symbol"] for row in await self._pool.fetch(SYMBOLS_SQL)]
        except Exception as exc:
            raise classify(exc) from exc

    async def mark_symbol(
        self, symbol: str, since: dt.datetime | None, until: dt.datetime | None
    ) -> int:
        """Queue every second of ``symbol`` holding ticks in [since, until); returns how many."""
        try:
            status = await self._pool.execute(BACKFILL_SQL, symbol, since, until)
        except Exception as exc:
            raise classify(exc) from exc
        return int(status.split()[-1])  # "INSERT 0 <rows>"


async def _lock_symbols(
    conn: PoolConnectionProxy[asyncpg.Record], limit: int, max_symbols: int
) -> tuple[list[str], int]:
    """Lock up to ``max_symbols`` symbols with queued marks; returns them and how many were busy."""
    locked: list[str] = []
    busy: list[str] = []
    # Each round asks only for the locks still allowed, so at most max_symbols are
    # taken; it excludes every symbol tried, so it adds one or the loop ends.
    while len(locked) < max_symbols:
        rows = await conn.fetch(LOCK_SYMBOLS_SQL, locked + busy, limit, max_symbols - len(locked))
        if not rows:
            break
        for row in rows:
            (locked if row["locked"] else busy).append(row["symbol"])
    return locked, len(busy)


def classify(exc: Exception) -> Exception:
    """Map an asyncpg/OS error to TransientError or FatalError (with what to do)."""
    if isinstance(exc, TransientError | FatalError):
        return exc
    if is_transient(exc):
        return TransientError(f"postgres: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.UndefinedTableError):
        return FatalError(
            f"Postgres at DATABASE_URL has no rollup tables ({exc});"
            " run `tickpipe schema apply --rollups`"
        )
    if isinstance(exc, asyncpg.UndefinedFunctionError):
        return FatalError(f"rollups need PostgreSQL 14 or later ({exc})")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return FatalError(f"DATABASE_URL: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return FatalError(f"Postgres refused the rollup: {type(exc).__name__}: {exc}")
    return FatalError(f"unexpected error from Postgres: {type(exc).__name__}: {exc}")
