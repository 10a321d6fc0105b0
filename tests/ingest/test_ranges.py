"""GET /ranges/{symbol}?at=T over HTTP, against a real Postgres with the rollup schema."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from flusher.db import Row, TickStore, last_per_key
from tests.conftest import fresh_database
from tickpipe.core.ticks import Tick, datetime_to_us
from tickpipe.lab.stack import LocalStack, free_port
from tickpipe.rollup.store import RollupStore

pytestmark = pytest.mark.services

READER = {"Authorization": "Bearer read-token-0123456789"}
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
T0_MS = datetime_to_us(T0) // 1000
Client = TestClient[Any, Any]
MakeClient = Callable[..., AbstractAsyncContextManager[Client]]


@pytest.fixture
async def rollup_url(stack: LocalStack) -> str:
    """A database with the rollup schema holding a few rolled-up ticks of AAPL."""
    url = await fresh_database(stack, "tickpipe_ranges_api")
    ticks = [
        ("AAPL", 1_100, "189.120000000000000001", "100"),
        ("AAPL", 1_900, "189.5", "0.5"),
        ("AAPL", 42_000, "188", "2"),
        ("MSFT", 1_500, "410", "1"),
    ]
    store = await TickStore.open(url, max_size=1)
    rows = (
        Row("1-0", Tick(s, datetime_to_us(T0) + ms * 1000, Decimal(p), Decimal(v), "t"))
        for s, ms, p, v in ticks
    )
    await store.upsert(last_per_key(rows))
    await store.close()
    rollups = await RollupStore.open(url)
    while (await rollups.merge_pass(100, (1, 60))).marks:
        pass
    await rollups.close()
    return url


@pytest.fixture
async def client(make_client: MakeClient, rollup_url: str) -> AsyncIterator[Client]:
    async with make_client(database_url=rollup_url) as test_client:
        yield test_client


async def test_the_windows_covering_t_narrowest_first(client: Client) -> None:
    response = await client.get(
        "/ranges/AAPL", params={"at": "2024-05-01T12:00:01.5Z"}, headers=READER
    )
    assert response.status == 200
    assert await response.json() == {
        "symbol": "AAPL",
        "at": "2024-05-01T12:00:01.500000Z",
        "ranges": [
            {
                "width": "1s",
                "start": "2024-05-01T12:00:01.000000Z",
                "end": "2024-05-01T12:00:02.000000Z",
                "open": "189.120000000000000001",
                "high": "189.5",
                "low": "189.120000000000000001",
                "close": "189.5",
                "volume": "100.5",
                "count": 2,
            },
            {
                "width": "1m",
                "start": "2024-05-01T12:00:00.000000Z",
                "end": "2024-05-01T12:01:00.000000Z",
                "open": "189.120000000000000001",
                "high": "189.5",
                "low": "188",
                "close": "188",
                "volume": "102.5",
                "count": 3,
            },
        ],
    }
    # The same instant as epoch milliseconds, and with an offset.
    by_ms = await client.get("/ranges/AAPL", params={"at": str(T0_MS + 1500)}, headers=READER)
    by_offset = await client.get(
        "/ranges/AAPL", params={"at": "2024-05-01T14:00:01.500+02:00"}, headers=READER
    )
    assert await by_ms.json() == await response.json() == await by_offset.json()


async def test_nothing_rolled_up_at_t_is_an_empty_list(client: Client) -> None:
    # Inside the minute, in a second with no tick: only the minute covers it.
    gap = await client.get("/ranges/AAPL", params={"at": str(T0_MS + 30_000)}, headers=READER)
    assert [r["width"] for r in (await gap.json())["ranges"]] == ["1m"]
    for symbol, at_ms in (("AAPL", T0_MS + 3_600_000), ("NOPE", T0_MS + 1500)):
        response = await client.get(f"/ranges/{symbol}", params={"at": str(at_ms)}, headers=READER)
        assert response.status == 200
        assert (await response.json())["ranges"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "at"),
        ({"at": "yesterday"}, "at"),
        ({"at": "2024-05-01T12:00:00"}, "at"),  # no offset
        ({"at": "-5"}, "at"),
        ({"at": str(T0_MS), "width": "1s"}, "width"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(
    client: Client, params: dict[str, str], field: str
) -> None:
    response = await client.get("/ranges/AAPL", params=params, headers=READER)
    assert response.status == 422
    body = await response.json()
    assert (body["error"], body["field"]) == ("invalid_parameter", field)


async def test_a_bad_symbol_is_422(client: Client) -> None:
    response = await client.get("/ranges/bad%20symbol", params={"at": "0"}, headers=READER)
    assert response.status == 422
    assert (await response.json())["field"] == "symbol"


async def test_reading_needs_a_token(client: Client) -> None:
    response = await client.get("/ranges/AAPL", params={"at": str(T0_MS)})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_database_without_rollups_is_404(make_client: MakeClient) -> None:
    async with make_client() as client:  # the shared database: base schema only
        response = await client.get("/ranges/AAPL", params={"at": str(T0_MS)}, headers=READER)
        assert response.status == 404
        body = await response.json()
    assert body["error"] == "rollups_disabled"
    assert "tickpipe schema apply --rollups" in body["detail"]


async def test_postgres_down_is_503(make_client: MakeClient) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/tickpipe"
    async with make_client(database_url=dead, query_timeout_s=2.0) as client:
        response = await client.get("/ranges/AAPL", params={"at": str(T0_MS)}, headers=READER)
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"] == "store_unavailable"
