"""The flusher's Postgres side: one pool, one bulk upsert per batch.

A batch goes to Postgres as COPY text built from the entries' bytes, with no
object per row: Postgres parses the values, and md_ticks' CHECK constraints
(schema.sql) hold the tick rules for every writer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import NamedTuple, TypeAlias

import asyncpg

from flusher.errors import RowsRejected
from tickpipe.core.errors import FatalError, TransientError
from tickpipe.core.keys import ENTRY_FIELDS
from tickpipe.core.pgerrors import is_transient
from tickpipe.core.pgpool import close_pool, keep_session, open_pool
from tickpipe.core.ticks import (
    MAX_DECIMAL_INTEGER_DIGITS,
    MAX_DECIMAL_SCALE,
    MAX_SOURCE_CHARS,
    MAX_TS_US,
    SYMBOL_PATTERN,
    Tick,
    TickError,
    from_fields,
)

RowKey: TypeAlias = tuple[bytes, bytes]
"""The identity of a staged row: symbol and ts (epoch microseconds) as ASCII bytes."""

_STAGE_COLUMNS = ("symbol", "ts_us", "price", "volume", "source", "stream_id")

# A per-connection staging table, emptied by every COMMIT (and gone with any ROLLBACK).
CREATE_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS md_ticks_stage (
    symbol text NOT NULL, ts_us bigint NOT NULL,
    price numeric NOT NULL, volume numeric NOT NULL, source text NOT NULL,
    stream_id text NOT NULL
) ON COMMIT DELETE ROWS
"""

# Rows arrive deduplicated (one per key) and are inserted sorted by key:
# competing flushers lock keys in the same order and cannot deadlock. A row is
# replaced only by a later stream entry: a replayed batch (reclaimed after its
# COMMIT) or an older version of a key committed late by another flusher
# changes nothing; last write wins by stream order, whatever the order of the
# commits. The comparison runs only on conflicting rows.
# The timestamp is exact: whole seconds (a float8 below 2^53) times 1 second,
# plus the microseconds; ts_us * interval '1 microsecond' alone goes through a
# float8 and rounds past 2^53 µs (the year 2255).
UPSERT_SQL = """
INSERT INTO md_ticks (symbol, ts, price, volume, source, stream_id)
SELECT symbol,
       timestamptz 'epoch' + (ts_us / 1000000) * interval '1 second'
                           + (ts_us % 1000000) * interval '1 microsecond',
       price, volume, source, stream_id
FROM md_ticks_stage ORDER BY symbol, ts_us
ON CONFLICT (symbol, ts) DO UPDATE
SET price = EXCLUDED.price, volume = EXCLUDED.volume, source = EXCLUDED.source,
    stream_id = EXCLUDED.stream_id
WHERE md_ticks.stream_id IS NULL
   OR (split_part(md_ticks.stream_id, '-', 1)::bigint,
       split_part(md_ticks.stream_id, '-', 2)::bigint)
    < (split_part(EXCLUDED.stream_id, '-', 1)::bigint,
       split_part(EXCLUDED.stream_id, '-', 2)::bigint)
"""


_DECIMAL = rf"[0-9]{{1,{MAX_DECIMAL_INTEGER_DIGITS}}}+(?:\.[0-9]{{1,{MAX_DECIMAL_SCALE}}}+)?+"
_SOURCE_CHAR = (
    # One character of a source, in UTF-8 (none of its control characters, and not
    # the backslash, which COPY's text format would take for an escape):
    r"[\x20-\x5b\x5d-\x7e]"  # printable ASCII
    r"|\xc2[\xa0-\xbf]|[\xc3-\xdf][\x80-\xbf]"  # two bytes, but U+0080-U+009F
    r"|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"  # three, but no
    r"|\xed[\x80-\x9f][\x80-\xbf]"  # surrogate
    r"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)
_ROW = (
    rf"{SYMBOL_PATTERN.removeprefix('^').removesuffix('$')}+\t"
    # Fewer digits than MAX_TS_US has, no leading zero: in range, one text per value.
    rf"(?:0|[1-9][0-9]{{0,{len(str(MAX_TS_US)) - 2}}}+)\t"
    rf"(?=[0.]*+[1-9]){_DECIMAL}\t"  # a price has a digit other than 0
    rf"{_DECIMAL}\t"
    # (An ASCII source, the common case, is matched without trying each alternative.)
    rf"(?:[\x20-\x5b\x5d-\x7e]{{1,{MAX_SOURCE_CHARS}}}+|(?:{_SOURCE_CHAR}){{1,{MAX_SOURCE_CHARS}}}+)\t"
    r"[0-9]++-[0-9]++"
)
_CANONICAL_ROW = re.compile(_ROW.encode())
"""A staged row as ingest's entries give it (tickpipe.core.ticks.to_fields): the values
and the entry id, tab-separated, each in its checked, canonical form."""
_CANONICAL_ROWS = re.compile(f"(?:{_ROW}\n)*+".encode())
"""Staged rows, one a line: a whole batch checked in one call."""
_FIELD_NAMES = [name.encode() for name in ENTRY_FIELDS]

Entries: TypeAlias = tuple[Sequence[bytes], Sequence[list[bytes] | None]]
"""Ids, and each one's flat field/value list as Redis sent it (None: deleted)."""


class StagedRows:
    """A batch's rows in md_ticks_stage's COPY text form: one per (symbol, ts), the last
    entry's. ``skipped``: the entries that give no row, as (list, index, why they cannot
    be decoded), why being None for an entry deleted from the stream."""

    __slots__ = ("_text", "rows", "skipped")

    def __init__(self) -> None:
        self.rows: dict[RowKey, bytes] = {}
        self.skipped: list[tuple[int, int, str | None]] = []
        self._text: bytes | None = None

    @classmethod
    def of(cls, batch: Sequence[Entries]) -> StagedRows:
        """Stage lists of entries, in stream order."""
        staged = cls()
        if not staged._stage_as_ingest_writes(batch):
            staged._stage_carefully(batch)
        return staged

    def text(self, keys: Sequence[RowKey] | None = None) -> bytes:
        """The COPY text of the rows of ``keys`` (default: all), a line each."""
        if keys is None:
            if self._text is None:
                self._text = _lines(self.rows.values())
            return self._text
        return _lines(self.rows[key] for key in keys)

    def _stage_as_ingest_writes(self, batch: Sequence[Entries]) -> bool:
        """The common case, entries as ingest writes them: their values are the rows'
        COPY text already, checked all at once (no call per row). False if one is not."""
        rows = self.rows
        names = _FIELD_NAMES
        for ids, fields in batch:
            for entry_id, values in zip(ids, fields, strict=True):
                if not values or values[0::2] != names:
                    rows.clear()
                    return False
                row = values[1::2]
                row.append(entry_id)
                rows[row[0], row[1]] = b"\t".join(row)
        text = _lines(rows.values())
        if _CANONICAL_ROWS.fullmatch(text) is None:
            rows.clear()
            return False
        self._text = text
        return True

    def _stage_carefully(self, batch: Sequence[Entries]) -> None:
        """Entry by entry: one not in ingest's exact form is decoded and checked as a Tick."""
        rows = self.rows
        canonical = _CANONICAL_ROW.fullmatch
        for number, (ids, fields) in enumerate(batch):
            for index, (entry_id, values) in enumerate(zip(ids, fields, strict=True)):
                if not values:
                    self.skipped.append((number, index, None))
                    continue
                if values[0::2] == _FIELD_NAMES:
                    line = b"\t".join([*values[1::2], entry_id])
                    if canonical(line) is not None:
                        rows[values[1], values[3]] = line
                        continue
                try:
                    key, line = _careful_row(entry_id, values)
                except TickError as exc:
                    self.skipped.append((number, index, str(exc)))
                else:
                    rows[key] = line


def _lines(rows: Iterable[bytes]) -> bytes:
    text = b"\n".join(rows)
    return text + b"\n" if text else text


def entry_key(entry_id: bytes, values: list[bytes] | None) -> RowKey | None:
    """The key of an entry's row, as :class:`StagedRows` has it; None if it gives no row."""
    return next(iter(StagedRows.of([([entry_id], [values])]).rows), None)


def _careful_row(entry_id: bytes, values: Sequence[bytes]) -> tuple[RowKey, bytes]:
    """An entry not in ingest's exact form (rare): decoded and checked as a Tick."""
    fields = dict(zip(values[0::2], values[1::2], strict=False))
    if len(values) != 2 * len(fields):
        raise TickError("stream entry repeats a field or lacks a value")
    return staged_row(entry_id.decode(), from_fields(fields))


def staged_row(stream_id: str, tick: Tick) -> tuple[RowKey, bytes]:
    """The staged row of a tick, with its key."""
    ts = str(tick.ts_us)
    line = "\t".join(
        (
            _copy_text(tick.symbol),
            ts,
            format(tick.price, "f"),
            format(tick.volume, "f"),
            _copy_text(tick.source),
            stream_id,
        )
    )
    return (tick.symbol.encode(), ts.encode()), line.encode()


def _copy_text(value: str) -> str:
    """``value`` escaped for COPY's text format."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


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
        # Its sessions hold nothing but the staging table: no reset query per batch.
        pool = await open_pool(
            database_url, max_size=max_size, init=_init_connection, reset=keep_session
        )
        return cls(pool)

    async def close(self, timeout_s: float = 2.0) -> None:
        await close_pool(self._pool, timeout_s)

    async def write(self, text: bytes) -> None:
        """Upsert staged rows (COPY text, a key once; :class:`StagedRows`) in one transaction.

        Returns after COMMIT.
        """
        if not text:
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.copy_to_table(
                    "md_ticks_stage",
                    source=_one_chunk(text),
                    columns=_STAGE_COLUMNS,
                    format="text",
                )
                await conn.execute(UPSERT_SQL)
        except Exception as exc:
            raise _classify(exc) from exc

    async def upsert(self, rows: Sequence[Row]) -> None:
        """Write ticks (unique keys) in one transaction; returns after COMMIT."""
        await self.write(_lines(staged_row(stream_id, tick)[1] for stream_id, tick in rows))


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    """COPY's data in one message (a file object would be read in a thread)."""
    yield data


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
