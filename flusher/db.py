"""The flusher's Postgres side: one pool, one bulk upsert per batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import asyncpg

from flusher.errors import FatalError, RowsRejected, TransientError
from tickpipe.pgerrors import is_transient
from tickpipe.pgpool import close_pool, open_pool
from tickpipe.ticks import Tick

_COLUMNS = ("symbol", "ts", "price", "volume", "source", "stream_id")

# A per-connection staging table, emptied by every COMMIT (and gone with any ROLLBACK).
CREATE_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS md_ticks_stage (
    symbol text NOT NULL, ts timestamptz NOT NULL,
    price numeric NOT NULL, volume numeric NOT NULL, source text NOT NULL,
    stream_id text NOT NULL
) ON COMMIT DELETE ROWS
"""

# Rows arrive deduplicated and sorted by key: competing flushers lock keys in
# the same order and cannot deadlock. A row is replaced only by a later stream
# entry: a replayed batch (reclaimed after its COMMIT) or an older version of a
# key committed late by another flusher changes nothing; last write wins by
# stream order, whatever the order of the commits. The comparison runs only on
# conflicting rows.
UPSERT_SQL = """
INSERT INTO md_ticks (symbol, ts, price, volume, source, stream_id)
SELECT symbol, ts, price, volume, source, stream_id FROM md_ticks_stage ORDER BY symbol, ts
ON CONFLICT (symbol, ts) DO UPDATE
SET price = EXCLUDED.price, volume = EXCLUDED.volume, source = EXCLUDED.source,
    stream_id = EXCLUDED.stream_id
WHERE md_ticks.stream_id IS NULL
   OR (split_part(md_ticks.stream_id, '-', 1)::bigint,
       split_part(md_ticks.stream_id, '-', 2)::bigint)
    < (split_part(EXCLUDED.stream_id, '-', 1)::bigint,
       split_part(EXCLUDED.stream_id, '-', 2)::bigint)
"""


class Row(NamedTuple):
    """A tick and the id of the stream entry it came from."""

    stream_id: str
    tick: Tick

    @property
    def key(self) -> tuple[str, int]:
        return self.tick.key


def last_per_key(rows: Iterable[Row]) -> list[Row]:
    """Keep the last row of each (symbol, ts), in stream order; return them sorted by key."""
    latest: dict[tuple[str, int], Row] = {}
    for row in rows:
        latest[row.key] = row
    return [latest[key] for key in sorted(latest)]


class TickStore:
    """md_ticks, written in batches."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, database_url: str, *, max_size: int = 4) -> TickStore:
        return cls(await open_pool(database_url, max_size=max_size, init=_init_connection))

    async def close(self, timeout_s: float = 2.0) -> None:
        await close_pool(self._pool, timeout_s)

    async def upsert(self, rows: Sequence[Row]) -> None:
        """Write ``rows`` (unique keys, sorted) in one transaction; returns after COMMIT."""
        if not rows:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(
                    "md_ticks_stage",
                    records=[
                        (t.symbol, t.ts, t.price, t.volume, t.source, stream_id)
                        for stream_id, t in rows
                    ],
                    columns=_COLUMNS,
                )
                await conn.execute(UPSERT_SQL)
        except Exception as exc:
            raise _classify(exc) from exc


# 22 data exception, 23 integrity constraint violation: the rows themselves.
_REJECTED_CLASSES = ("22", "23")


def _classify(exc: Exception) -> Exception:
    """Map an asyncpg/OS error to TransientError, RowsRejected or FatalError."""
    if is_transient(exc):
        return TransientError(f"postgres: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        if sqlstate[:2] in _REJECTED_CLASSES:
            return RowsRejected(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, asyncpg.UndefinedTableError):
            return FatalError(
                f"Postgres at DATABASE_URL has no md_ticks ({exc}); run `tickpipe schema apply`"
            )
        return FatalError(f"Postgres refused the write: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.DataError):  # asyncpg could not encode a value
        return RowsRejected(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return FatalError(f"DATABASE_URL: {exc}")
    return FatalError(f"unexpected error writing to Postgres: {type(exc).__name__}: {exc}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(CREATE_STAGE_SQL)
