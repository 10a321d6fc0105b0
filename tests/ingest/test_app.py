"""The ingest endpoint against a real Redis: accepted ticks, refusals, outages."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from ingest.app import create_app
from tickpipe.settings import Settings
from tickpipe.stack import free_port

pytestmark = pytest.mark.services

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = {
    "symbol": "AAPL",
    "ts": "2024-05-01T12:00:00.123456Z",
    "price": "189.1200",
    "volume": 100,
    "source": "nasdaq",
}


@pytest.fixture
async def client(settings: Settings, redis: Redis) -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


async def test_accepts_a_tick(client: TestClient[object, object], redis: Redis) -> None:
    response = await client.post("/ingest/tick", json=GOOD, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    assert body["accepted"] == 1
    [entry_id] = body["ids"]
    [(got_id, fields)] = await redis.xrange("ticks.received")
    assert got_id.decode() == entry_id
    assert fields == {
        b"symbol": b"AAPL",
        b"ts": b"1714564800123456",
        b"price": b"189.1200",
        b"volume": b"100",
        b"source": b"nasdaq",
    }
    latest = json.loads(await redis.hget("ticks:latest", "AAPL"))
    assert latest == {
        "ts": "1714564800123456",
        "price": "189.1200",
        "volume": "100",
        "source": "nasdaq",
        "id": entry_id,
    }


async def test_latest_keeps_the_newest_ts(client: TestClient[object, object], redis: Redis) -> None:
    newer = {**GOOD, "ts": "2024-05-01T12:00:01Z", "price": "2"}
    older = {**GOOD, "ts": "2024-05-01T11:59:59Z", "price": "3"}
    for tick in (newer, older):
        assert (await client.post("/ingest/tick", json=tick, headers=AUTH)).status == 200
    latest = json.loads(await redis.hget("ticks:latest", "AAPL"))
    assert latest["price"] == "2"
    assert await redis.xlen("ticks.received") == 2


async def test_ingest_creates_the_group_from_the_first_entry(
    client: TestClient[object, object], redis: Redis
) -> None:
    [group] = await redis.xinfo_groups("ticks.received")
    assert group["name"] == b"flushers"
    assert group["last-delivered-id"] == b"0-0"


@pytest.mark.parametrize(
    ("headers", "body", "status", "error", "field"),
    [
        ({}, json.dumps(GOOD), 401, "unauthorized", None),
        ({"Authorization": "Bearer wrong"}, json.dumps(GOOD), 401, "unauthorized", None),
        ({"Authorization": f"Basic {TOKEN}"}, json.dumps(GOOD), 401, "unauthorized", None),
        (
            {**AUTH, "Content-Type": "text/plain"},
            json.dumps(GOOD),
            415,
            "unsupported_media_type",
            None,
        ),
        (AUTH, "{not json", 400, "malformed_json", None),
        (AUTH, json.dumps({**GOOD, "price": "NaN"}), 422, "invalid_field", "price"),
        (AUTH, json.dumps({**GOOD, "price": -1}), 422, "invalid_field", "price"),
        (AUTH, json.dumps({**GOOD, "ts": "2024-05-01T12:00:00"}), 422, "invalid_field", "ts"),
        (AUTH, json.dumps({**GOOD, "symbol": "A B"}), 422, "invalid_field", "symbol"),
        (AUTH, json.dumps({**GOOD, "extra": 1}), 422, "invalid_field", "extra"),
        (
            AUTH,
            json.dumps({k: v for k, v in GOOD.items() if k != "source"}),
            422,
            "invalid_field",
            "source",
        ),
        (AUTH, json.dumps(GOOD) + " " * 5_000_000, 413, "too_large", None),
    ],
)
async def test_refusals_append_nothing(
    client: TestClient[object, object],
    redis: Redis,
    headers: dict[str, str],
    body: str,
    status: int,
    error: str,
    field: str | None,
) -> None:
    headers = {"Content-Type": "application/json", **headers}
    response = await client.post("/ingest/tick", data=io.BytesIO(body.encode()), headers=headers)
    assert response.status == status
    payload = await response.json()
    assert payload["error"] == error
    assert payload["detail"]
    assert payload.get("field") == field
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis.xlen("ticks.received") == 0
    assert await redis.hlen("ticks:latest") == 0


async def test_unknown_route_is_json(client: TestClient[object, object]) -> None:
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


async def test_redis_down_gives_503(settings: Settings) -> None:
    dead = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with TestClient(TestServer(create_app(dead))) as client:
        response = await client.post("/ingest/tick", json=GOOD, headers=AUTH)
        assert response.status == 503
        assert (await response.json())["error"] == "redis_unavailable"
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200


async def test_readyz(client: TestClient[object, object]) -> None:
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}
