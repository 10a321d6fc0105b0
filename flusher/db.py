"""The flusher's Postgres side: one pool, one bulk upsert per batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import asyncpg

from flusher.errors import FatalError, RowsRejected, TransientError
from tickpipe.ticks import Tick

_COLUMNS = ("symbol", "ts", "price", "volume", "source")

# A per-connection staging table, emptied by every COMMIT (and gone with any ROLLBACK).
CREATE_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS md_ticks_stage (
    symbol text NOT NULL, ts timestamptz NOT NULL,
    price numeric NOT NULL, volume numeric NOT NULL, source text NOT NULL
) ON COMMIT DELETE ROWS
"""

# Rows arrive deduplicated and sorted by key: competing flushers lock keys in
# the same order and cannot deadlock. An identical replay (a batch reclaimed
# after its COMMIT) leaves rows untouched instead of writing new versions.
UPSERT_SQL = """
INSERT INTO md_ticks (symbol, ts, price, volume, source)
SELECT symbol, ts, price, volume, source FROM md_ticks_stage ORDER BY symbol, ts
ON CONFLICT (symbol, ts) DO UPDATE
SET price = EXCLUDED.price, volume = EXCLUDED.volume, source = EXCLUDED.source
WHERE (md_ticks.price, md_ticks.volume, md_ticks.source)
    IS DISTINCT FROM (EXCLUDED.price, EXCLUDED.volume, EXCLUDED.source)
"""


def last_per_key(ticks: Iterable[Tick]) -> list[Tick]:
    """Keep the last tick of each (symbol, ts), in stream order; return them sorted by key."""
    latest: dict[tuple[str, int], Tick] = {}
    for tick in ticks:
        latest[tick.key] = tick
    return [latest[key] for key in sorted(latest)]


class TickStore:
    """md_ticks, written in batches."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, database_url: str, *, max_size: int = 4) -> TickStore:
        # min_size=0: no connection is made here, so a flusher starts (and
        # retries with backoff) while Postgres is down.
        pool = await asyncpg.create_pool(
            database_url, min_size=0, max_size=max_size, init=_init_connection
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def upsert(self, rows: Sequence[Tick]) -> None:
        """Write ``rows`` (unique keys, sorted) in one transaction; returns after COMMIT."""
        if not rows:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(
                    "md_ticks_stage",
                    records=[(t.symbol, t.ts, t.price, t.volume, t.source) for t in rows],
                    columns=_COLUMNS,
                )
                await conn.execute(UPSERT_SQL)
        except Exception as exc:
            raise _classify(exc) from exc

    async def check(self) -> None:
        """Raise unless md_ticks can be written (the readiness probe)."""
        try:
            async with self._pool.acquire() as conn:
                await conn.execute("SELECT 1 FROM md_ticks LIMIT 0")
        except Exception as exc:
            raise _classify(exc) from exc


# SQLSTATE classes: 08 connection, 40 transaction rollback (deadlock,
# serialization), 53 insufficient resources, 57 operator intervention
# (shutdown, cannot connect now), 58 system error.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
# 22 data exception, 23 integrity constraint violation: the rows themselves.
_REJECTED_CLASSES = ("22", "23")


def _classify(exc: Exception) -> Exception:
    """Map an asyncpg/OS error to TransientError, RowsRejected or FatalError."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        if sqlstate[:2] in _TRANSIENT_CLASSES:
            return TransientError(f"postgres: {exc}")
        if sqlstate[:2] in _REJECTED_CLASSES:
            return RowsRejected(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, asyncpg.UndefinedTableError):
            return FatalError(
                f"Postgres at DATABASE_URL has no md_ticks ({exc}); run `tickpipe schema apply`"
            )
        return FatalError(f"Postgres refused the write: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return FatalError(f"DATABASE_URL: {exc}")
    if isinstance(exc, OSError | asyncpg.InterfaceError | TimeoutError):
        return TransientError(f"postgres: {type(exc).__name__}: {exc}")
    return FatalError(f"unexpected error writing to Postgres: {type(exc).__name__}: {exc}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(CREATE_STAGE_SQL)
