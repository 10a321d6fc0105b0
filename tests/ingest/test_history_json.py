"""Histories and ranges built as JSON by Postgres answer byte for byte what Python wrote.

The reference is the encoder the read API used before Postgres wrote the JSON:
rows fetched as Python values (Decimal, datetime), turned into ticks by
:func:`tickpipe.core.ticks.to_json` and encoded by msgspec. Random rows cover what
the tick rules allow: 1 to 78 integer digits, 0 to 18 fraction digits with trailing
zeros, zero volumes, microseconds, the first and last instants of the ts range, and
sources with quotes, backslashes, slashes and characters beyond ASCII.
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import msgspec
import pytest
from aiohttp.test_utils import TestClient

from ingest import history
from ingest.queries import encode_cursor
from tickpipe.core.ticks import EPOCH, MAX_TS_US, datetime_to_us, to_json

pytestmark = pytest.mark.services

READER = {"Authorization": "Bearer read-token-0123456789"}
Client = TestClient[Any, Any]
SOURCES = [
    "feed-a",
    'quote"d',
    "back\\slash",
    "a/b",
    "é",
    "日本取引所",
    "\u2028",
    "emoji 📈",
    "x" * 64,
]


def random_decimal(rng: random.Random, *, zero: bool) -> Decimal:
    whole = rng.choice([0, 1, rng.randint(1, 9), rng.randint(1, 30), 78])
    scale = rng.choice([0, rng.randint(1, 18), 18])
    digits = "".join(rng.choice("0123456789") for _ in range(whole)).lstrip("0") or "0"
    fraction = "".join(rng.choice("0123456789") for _ in range(scale))
    if rng.random() < 0.1:
        fraction = fraction[:-3] + "000"[: len(fraction)]  # trailing zeros stay
    if not zero and digits == "0" and fraction.strip("0") == "":
        digits = "1"
    return Decimal(digits + (f".{fraction}" if fraction else ""))


async def store_random_rows(
    pg: asyncpg.Connection, rng: random.Random, symbol: str, count: int
) -> None:
    """``count`` rows of random ticks, ts as the flusher writes it (asyncpg would write
    the last instant, 9999-12-31T23:59:59.999999Z, as 'infinity')."""
    stamps = {0, MAX_TS_US} | {rng.randint(0, MAX_TS_US) for _ in range(count - 2)}
    rows = [
        (
            symbol,
            ts_us,
            random_decimal(rng, zero=False),
            random_decimal(rng, zero=True),
            rng.choice(SOURCES),
        )
        for ts_us in stamps
    ]
    await pg.execute(
        "CREATE TEMP TABLE IF NOT EXISTS random_ticks"
        " (symbol text, ts_us bigint, price numeric, volume numeric, source text)"
    )
    await pg.execute("TRUNCATE random_ticks")
    await pg.copy_records_to_table("random_ticks", records=rows)
    await pg.execute(
        "INSERT INTO md_ticks (symbol, ts, price, volume, source)"
        " SELECT symbol, timestamptz 'epoch' + (ts_us / 1000000) * interval '1 second'"
        " + (ts_us % 1000000) * interval '1 microsecond', price, volume, source"
        " FROM random_ticks"
    )


_json = msgspec.json.Encoder()


def reference_ticks(symbol: str, rows: list[asyncpg.Record]) -> list[dict[str, str]]:
    """The ticks as the Python encoder wrote them: rows as Ticks, then to_json."""
    return [to_json(tick) for tick in history._ticks(symbol, rows)]


async def test_a_history_is_the_python_encoders_bytes(
    client: Client, pg: asyncpg.Connection
) -> None:
    rng = random.Random(20261202)
    symbols = ["HIST", "a.b:c/d-e_f", "Z"]
    for symbol in symbols:
        await store_random_rows(pg, rng, symbol, 600)
    for symbol in [*symbols, "NONE"]:
        for limit in (1, 7, 600, 10_000):
            rows = await pg.fetch(history.NEWEST_SQL, symbol, limit)
            expected = _json.encode(
                {"symbol": symbol, "order": "newest_first", "ticks": reference_ticks(symbol, rows)}
            )
            response = await client.get(
                f"/ticks/{quote(symbol, safe='')}", params={"limit": limit}, headers=READER
            )
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.read() == expected, (symbol, limit)


async def test_every_page_of_a_range_is_the_python_encoders_bytes(
    client: Client, pg: asyncpg.Connection
) -> None:
    rng = random.Random(31337)
    symbol = "RANGE"
    await store_random_rows(pg, rng, symbol, 1000)
    for limit in (1, 333, 1000, 1001):
        # From the first instant on, with no end: the last instant (MAX_TS_US) is in.
        params: dict[str, str] = {"from": "0", "limit": str(limit)}
        first_us, last_us = 0, MAX_TS_US
        pages = 0
        while True:
            rows = await pg.fetch(
                history.BETWEEN_SQL,
                symbol,
                EPOCH + dt.timedelta(microseconds=first_us),
                EPOCH + dt.timedelta(microseconds=last_us),
                limit + 1,
            )
            ticks = reference_ticks(symbol, rows[:limit])
            body: dict[str, object] = {"symbol": symbol, "order": "oldest_first", "ticks": ticks}
            body["next_cursor"] = body["next"] = None
            if len(rows) > limit:
                cursor = encode_cursor(datetime_to_us(rows[limit - 1]["ts"]))
                body["next_cursor"] = cursor
                body["next"] = f"/ticks/{symbol}?{urlencode({**params, 'cursor': cursor})}"
            response = await client.get(f"/ticks/{symbol}", params=params, headers=READER)
            assert response.status == 200
            assert await response.read() == _json.encode(body), (limit, pages)
            pages += 1
            if body["next_cursor"] is None:
                break
            params["cursor"] = str(body["next_cursor"])
            first_us = datetime_to_us(rows[limit - 1]["ts"]) + 1
        assert pages == -(-1000 // limit)


async def test_a_row_written_with_an_infinite_ts_is_left_out(
    client: Client, pg: asyncpg.Connection
) -> None:
    """No tick has one (ingest refuses it), but another writer may store 'infinity'."""
    await pg.execute(
        "INSERT INTO md_ticks (symbol, ts, price, volume, source) VALUES"
        " ('INF', 'infinity', 1, 1, 's'), ('INF', '-infinity', 1, 1, 's'),"
        " ('INF', '2024-05-01T12:00:00Z', 2.50, 0, 's')"
    )
    response = await client.get("/ticks/INF", headers=READER)
    assert response.status == 200
    assert await response.read() == (
        b'{"symbol":"INF","order":"newest_first","ticks":[{"symbol":"INF",'
        b'"ts":"2024-05-01T12:00:00.000000Z","price":"2.50","volume":"0","source":"s"}]}'
    )
