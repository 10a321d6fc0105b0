"""Properties of ingest: exact round trips, one entry per accepted tick."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ingest.app import create_app
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import (
    EPOCH,
    MAX_DECIMAL_INTEGER_DIGITS,
    MAX_DECIMAL_SCALE,
    Tick,
    from_fields,
)

pytestmark = pytest.mark.services

AUTH = {"Authorization": "Bearer test-token-0123456789"}
Client = TestClient[Any, Any]


@pytest.fixture
async def client(settings: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


# -- exact round trip ---------------------------------------------------------------------

symbols = st.from_regex(r"[A-Za-z0-9._:/-]{1,32}", fullmatch=True)
sources = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=64
)


@st.composite
def decimals(draw: st.DrawFn, *, allow_zero: bool) -> str:
    """Decimal text within the contract: <= 78 integer and <= 18 fraction digits."""
    integer = draw(st.integers(0, 10**MAX_DECIMAL_INTEGER_DIGITS - 1))
    fraction = draw(st.text(alphabet="0123456789", max_size=MAX_DECIMAL_SCALE))
    text = f"{integer}.{fraction}" if fraction else str(integer)
    if not allow_zero and Decimal(text) == 0:
        text = "0." + "0" * 17 + "1"
    return text


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[int | str, int]:
    """A wire ts and the epoch microseconds it means."""
    if draw(st.booleans()):
        ms = draw(st.integers(0, 253402300799999))
        return ms, ms * 1000
    offset = dt.timezone(dt.timedelta(minutes=draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))))
    naive = draw(
        st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(9999, 12, 30))
    )
    moment = naive.replace(tzinfo=offset)
    text = moment.isoformat()
    if draw(st.booleans()) and moment.utcoffset() == dt.timedelta(0):
        text = text.replace("+00:00", "Z")
    return text, (moment - EPOCH) // dt.timedelta(microseconds=1)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    symbol=symbols,
    ts=timestamps(),
    price=decimals(allow_zero=False),
    volume=decimals(allow_zero=True),
    source=sources,
    price_as_number=st.booleans(),
    volume_as_number=st.booleans(),
)
async def test_any_valid_tick_round_trips_exactly(
    client: Client,
    redis: Redis,
    symbol: str,
    ts: tuple[int | str, int],
    price: str,
    volume: str,
    source: str,
    price_as_number: bool,
    volume_as_number: bool,
) -> None:
    wire_ts, ts_us = ts
    # Numbers are written into the JSON text verbatim: no float anywhere.
    body = (
        "{"
        f'"symbol":{json.dumps(symbol)},"ts":{json.dumps(wire_ts)},'
        f'"price":{price if price_as_number else json.dumps(price)},'
        f'"volume":{volume if volume_as_number else json.dumps(volume)},'
        f'"source":{json.dumps(source)}'
        "}"
    )
    response = await client.post(
        "/ingest/tick", data=body.encode(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 200, await response.text()
    [entry_id] = (await response.json())["ids"]
    [(_, fields)] = await redis.xrange("ticks.received", entry_id, entry_id)
    assert from_fields(fields) == Tick(symbol, ts_us, Decimal(price), Decimal(volume), source)
    assert fields[b"price"].decode() == price
    assert fields[b"volume"].decode() == volume


# -- concurrency ------------------------------------------------------------------------------


async def test_every_200_is_exactly_one_entry_per_tick(client: Client, redis: Redis) -> None:
    sent: dict[str, dict[str, Any]] = {}
    symbols_ = ["AAPL", "MSFT", "EURUSD", "BTC-USD"]  # overlapping across clients

    async def feeder(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(25):
            ticks = [
                {
                    "symbol": rng.choice(symbols_),
                    "ts": 1714564800000 + rng.randrange(500),  # keys collide on purpose
                    "price": f"{rng.randrange(1, 10**6)}.{rng.randrange(100):02d}",
                    "volume": rng.randrange(1000),
                    "source": f"feeder-{seed}-{n}",
                }
                for _ in range(rng.randint(1, 8))
            ]
            if len(ticks) == 1 and rng.random() < 0.5:
                response = await client.post("/ingest/tick", json=ticks[0], headers=AUTH)
            else:
                response = await client.post("/ingest/ticks", json=ticks, headers=AUTH)
            assert response.status == 200
            ids = (await response.json())["ids"]
            assert len(ids) == len(ticks)
            for entry_id, tick in zip(ids, ticks, strict=True):
                assert entry_id not in sent
                sent[entry_id] = tick

    await asyncio.gather(*(feeder(seed) for seed in range(20)))
    entries = await redis.xrange("ticks.received")
    assert len(entries) == len(sent)
    for raw_id, fields in entries:
        tick = sent[raw_id.decode()]
        assert fields[b"symbol"].decode() == tick["symbol"]
        assert fields[b"ts"].decode() == str(tick["ts"] * 1000)
        assert fields[b"price"].decode() == tick["price"]
        assert fields[b"source"].decode() == tick["source"]
