"""The ingest endpoints against a real Redis: accepted ticks, every refusal, outages."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from ingest.app import create_app
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import LocalStack, free_port

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
Client = TestClient[Any, Any]
MakeClient = Callable[..., AbstractAsyncContextManager[Client]]


def ndjson(*ticks: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(t).encode() + b"\n" for t in ticks)


def tick_at(second: int, **changes: Any) -> dict[str, Any]:
    return {**GOOD, "ts": f"2024-05-01T12:00:{second:02d}Z", **changes}


# -- accepted ---------------------------------------------------------------------------


async def test_accepts_a_tick(client: Client, redis: Redis) -> None:
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


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
async def test_accepts_a_batch_in_order(client: Client, redis: Redis, content_type: str) -> None:
    ticks = [tick_at(s, symbol=f"S{s % 3}", price=f"{s}.5") for s in range(10)]
    body = json.dumps(ticks).encode() if content_type == "application/json" else ndjson(*ticks)
    response = await client.post(
        "/ingest/ticks", data=body, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status == 200, await response.text()
    payload = await response.json()
    assert payload["accepted"] == 10
    entries = await redis.xrange("ticks.received")
    assert [e[0].decode() for e in entries] == payload["ids"]
    assert [e[1][b"price"].decode() for e in entries] == [t["price"] for t in ticks]


async def test_latest_keeps_the_newest_ts(client: Client, redis: Redis) -> None:
    batch = [tick_at(1, price="2"), tick_at(0, price="3"), tick_at(1, symbol="B", price="4")]
    response = await client.post("/ingest/ticks", json=batch, headers=AUTH)
    assert response.status == 200
    assert (
        await client.post("/ingest/tick", json=tick_at(0, price="5"), headers=AUTH)
    ).status == 200
    assert json.loads(await redis.hget("ticks:latest", "AAPL"))["price"] == "2"
    assert json.loads(await redis.hget("ticks:latest", "B"))["price"] == "4"
    # An equal ts is a replacement of the same key: it wins, as it does in md_ticks.
    assert (
        await client.post("/ingest/tick", json=tick_at(1, price="6"), headers=AUTH)
    ).status == 200
    assert json.loads(await redis.hget("ticks:latest", "AAPL"))["price"] == "6"


async def test_ingest_creates_the_group_from_the_first_entry(client: Client, redis: Redis) -> None:
    [group] = await redis.xinfo_groups("ticks.received")
    assert group["name"] == b"flushers"
    assert group["last-delivered-id"] == b"0-0"


# -- refused ----------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
ND = {"Content-Type": "application/x-ndjson"}
OK = {**AUTH, **JSON}
BIG = json.dumps(GOOD) + " " * 5_000_000


def body(**changes: Any) -> bytes:
    """GOOD with some fields changed (a value of None drops the field)."""
    tick = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    return json.dumps(tick).encode()


def refusal(
    name: str,
    path: str,
    headers: dict[str, str],
    data: bytes,
    status: int,
    error: str,
    index: int | None = None,
    field: str | None = None,
) -> Any:
    return pytest.param(path, headers, data, status, error, index, field, id=name)


REFUSALS = [
    refusal("no token", "tick", JSON, body(), 401, "unauthorized"),
    refusal(
        "bad token", "tick", {**JSON, "Authorization": "Bearer x"}, body(), 401, "unauthorized"
    ),
    refusal(
        "basic", "tick", {**JSON, "Authorization": f"Basic {TOKEN}"}, b"{}", 401, "unauthorized"
    ),
    refusal("batch no token", "ticks", JSON, b"[]", 401, "unauthorized"),
    refusal(
        "text/plain",
        "tick",
        {**AUTH, "Content-Type": "text/plain"},
        body(),
        415,
        "unsupported_media_type",
    ),
    refusal("ndjson to /tick", "tick", {**AUTH, **ND}, ndjson(GOOD), 415, "unsupported_media_type"),
    refusal(
        "form",
        "ticks",
        {**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        b"a=1",
        415,
        "unsupported_media_type",
    ),
    refusal("body too large", "tick", OK, BIG.encode(), 413, "too_large"),
    refusal("batch body too large", "ticks", OK, f"[{BIG}]".encode(), 413, "too_large"),
    refusal("batch too many", "ticks", OK, json.dumps([GOOD] * 6).encode(), 413, "batch_too_large"),
    refusal("not json", "tick", OK, b"{not json", 400, "malformed_json"),
    refusal("empty body", "tick", OK, b"", 400, "malformed_json"),
    refusal("batch not json", "ticks", OK, b"[{", 400, "malformed_json"),
    refusal(
        "ndjson bad line", "ticks", {**AUTH, **ND}, ndjson(GOOD) + b"{x\n", 400, "malformed_json", 1
    ),
    refusal("empty batch", "ticks", OK, b"[]", 422, "invalid_batch"),
    refusal("empty ndjson", "ticks", {**AUTH, **ND}, b"\n\n", 422, "invalid_batch"),
    refusal("object to /ticks", "ticks", OK, body(), 422, "invalid_batch"),
    refusal("array to /tick", "tick", OK, json.dumps([GOOD]).encode(), 422, "invalid_field"),
    refusal("NaN", "tick", OK, body(price="NaN"), 422, "invalid_field", None, "price"),
    refusal("Infinity", "tick", OK, body(price="Infinity"), 422, "invalid_field", None, "price"),
    refusal(
        "huge exponent", "tick", OK, body(price="1e999999"), 422, "invalid_field", None, "price"
    ),
    refusal("tiny exponent", "tick", OK, body(price="1e-30"), 422, "invalid_field", None, "price"),
    refusal(
        "huge exponent as a number",
        "tick",
        OK,
        body(price="X").replace(b'"X"', b"1E+999999999"),
        422,
        "invalid_field",
        None,
        "price",
    ),
    refusal(
        "79-digit volume", "tick", OK, body(volume=10**78), 422, "invalid_field", None, "volume"
    ),
    refusal(
        "79-digit price", "tick", OK, body(price="1" * 79), 422, "invalid_field", None, "price"
    ),
    refusal(
        "19 fraction digits",
        "tick",
        OK,
        body(volume="0." + "1" * 19),
        422,
        "invalid_field",
        None,
        "volume",
    ),
    refusal(
        "a million digits", "tick", OK, body(price="1" * 10**6), 422, "invalid_field", None, "price"
    ),
    refusal("zero price", "tick", OK, body(price=0), 422, "invalid_field", None, "price"),
    refusal("negative volume", "tick", OK, body(volume="-1"), 422, "invalid_field", None, "volume"),
    refusal("bool volume", "tick", OK, body(volume=True), 422, "invalid_field", None, "volume"),
    refusal(
        "naive ts", "tick", OK, body(ts="2024-05-01T12:00:00"), 422, "invalid_field", None, "ts"
    ),
    refusal(
        "ns ts",
        "tick",
        OK,
        body(ts="2024-05-01T12:00:00.123456789Z"),
        422,
        "invalid_field",
        None,
        "ts",
    ),
    refusal("float ts", "tick", OK, body(ts=1.5), 422, "invalid_field", None, "ts"),
    refusal("empty symbol", "tick", OK, body(symbol=""), 422, "invalid_field", None, "symbol"),
    refusal("long symbol", "tick", OK, body(symbol="A" * 33), 422, "invalid_field", None, "symbol"),
    refusal("spaced symbol", "tick", OK, body(symbol="A B"), 422, "invalid_field", None, "symbol"),
    refusal("empty source", "tick", OK, body(source=""), 422, "invalid_field", None, "source"),
    refusal("long source", "tick", OK, body(source="s" * 65), 422, "invalid_field", None, "source"),
    refusal(
        "NUL in source", "tick", OK, body(source="a\u0000b"), 422, "invalid_field", None, "source"
    ),
    refusal("unknown field", "tick", OK, body(extra=1), 422, "invalid_field", None, "extra"),
    refusal("missing field", "tick", OK, body(source=None), 422, "invalid_field", None, "source"),
    refusal(
        "bad tick in batch",
        "ticks",
        OK,
        json.dumps([GOOD, GOOD, {**GOOD, "price": -1}]).encode(),
        422,
        "invalid_field",
        2,
        "price",
    ),
    refusal(
        "bad ndjson tick",
        "ticks",
        {**AUTH, **ND},
        ndjson(GOOD, {**GOOD, "ts": "x"}),
        422,
        "invalid_field",
        1,
        "ts",
    ),
]


@pytest.mark.parametrize(("path", "headers", "data", "status", "error", "index", "field"), REFUSALS)
async def test_refusals_append_nothing(
    make_client: MakeClient,
    redis: Redis,
    path: str,
    headers: dict[str, str],
    data: bytes,
    status: int,
    error: str,
    index: int | None,
    field: str | None,
) -> None:
    async with make_client(ingest_max_batch=5) as client:
        response = await client.post(f"/ingest/{path}", data=io.BytesIO(data), headers=headers)
        assert response.status == status
        payload = await response.json()
    assert payload["error"] == error
    assert payload["detail"]
    assert payload.get("index") == index
    assert payload.get("field") == field
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis.xlen("ticks.received") == 0
    assert await redis.hlen("ticks:latest") == 0


@pytest.mark.parametrize(
    ("field", "value", "detail"),
    [
        ("volume", str(10**78).encode(), "volume is out of range: at most 78 digits before and 18"),
        ("price", b'"' + b"1" * 79 + b'"', "price is out of range: at most 78 digits before"),
        ("volume", b"0." + b"1" * 19, "volume is out of range: at most 78 digits before and 18"),
        ("price", b"1e999999", "price is out of range: at most 78 digits before and 18 after"),
        ("price", b'"1E+999999999"', "price is out of range"),
        ("price", b"1" * 10**6, "price is too long: at most 128 characters"),
        ("volume", b'"' + b"1" * 10**6 + b'"', "volume is too long: at most 128 characters"),
    ],
)
async def test_out_of_range_decimals_are_refused_quickly_naming_the_field(
    client: Client, redis: Redis, field: str, value: bytes, detail: str
) -> None:
    data = body(**{field: "X"}).replace(b'"X"', value)
    started = time.monotonic()
    response = await client.post("/ingest/tick", data=data, headers=OK)
    assert time.monotonic() - started < 2  # bounded before conversion: nothing is expanded
    assert response.status == 422
    payload = await response.json()
    assert (payload["error"], payload["field"]) == ("invalid_field", field)
    assert payload["detail"].startswith(detail)
    assert await redis.xlen("ticks.received") == 0


async def test_the_largest_decimals_are_accepted_digit_for_digit(
    client: Client, redis: Redis
) -> None:
    price = "9" * 78 + "." + "9" * 18
    data = body(volume="X").replace(b'"X"', str(2**256 - 1).encode())
    response = await client.post("/ingest/tick", data=data, headers=OK)
    assert response.status == 200, await response.text()
    response = await client.post("/ingest/tick", json={**GOOD, "price": price}, headers=AUTH)
    assert response.status == 200, await response.text()
    entries = await redis.xrange("ticks.received")
    assert entries[0][1][b"volume"] == str(2**256 - 1).encode()
    assert entries[1][1][b"price"] == price.encode()


async def test_chunked_body_over_the_limit_is_refused(
    make_client: MakeClient, redis: Redis
) -> None:
    """No Content-Length to check up front: reading stops at the limit."""
    async with make_client(ingest_max_body_bytes=1000) as client:
        payload = json.dumps([GOOD] * 50).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 256):
                yield payload[start : start + 256]

        response = await client.post("/ingest/ticks", data=chunks(), headers={**AUTH, **JSON})
        assert "Content-Length" not in response.request_info.headers
        assert response.status == 413
        assert (await response.json())["error"] == "too_large"
    assert await redis.xlen("ticks.received") == 0


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    response = await client.get("/ingest/tick")
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"


# -- backpressure ------------------------------------------------------------------------


async def test_backpressure_429_until_the_flushers_catch_up(
    make_client: MakeClient, redis: Redis, settings: Settings
) -> None:
    async with make_client(ingest_max_backlog=3, ingest_backlog_poll_s=0.02) as client:
        for second in range(4):
            assert (
                await client.post("/ingest/tick", json=tick_at(second), headers=AUTH)
            ).status == 200
        await asyncio.sleep(0.2)
        response = await client.post("/ingest/tick", json=tick_at(9), headers=AUTH)
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"] == "backpressure"
        assert await redis.xlen("ticks.received") == 4

        # A flusher reads and acknowledges everything: the backlog drains.
        entries = await redis.xreadgroup("flushers", "f", {"ticks.received": ">"})
        await redis.xack("ticks.received", "flushers", *[i for i, _ in entries[0][1]])
        await asyncio.sleep(0.2)
        assert (await client.post("/ingest/tick", json=tick_at(9), headers=AUTH)).status == 200


# -- Redis outages ---------------------------------------------------------------------


async def test_redis_unreachable_gives_503(settings: Settings) -> None:
    dead = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with TestClient(TestServer(create_app(dead))) as client:
        response = await client.post("/ingest/tick", json=GOOD, headers=AUTH)
        assert response.status == 503
        body = await response.json()
        assert body["error"] == "redis_unavailable"
        assert response.headers["Retry-After"] == "1"
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200


async def test_recovers_when_redis_comes_back(
    client: Client, redis: Redis, stack: LocalStack
) -> None:
    assert (await client.post("/ingest/tick", json=tick_at(1), headers=AUTH)).status == 200
    stack.stop_redis()
    try:
        response = await client.post("/ingest/tick", json=tick_at(2), headers=AUTH)
        assert response.status == 503
        assert (await client.get("/readyz")).status == 503
    finally:
        stack.start_redis()
    # A request may still meet a connection the restart closed (503: the feeder resends).
    for _ in range(50):
        response = await client.post("/ingest/tick", json=tick_at(3), headers=AUTH)
        if response.status != 503:
            break
        await asyncio.sleep(0.1)
    assert response.status == 200
    assert (await client.get("/readyz")).status == 200
    # The entry acknowledged before the restart survived it (AOF).
    await redis.connection_pool.disconnect()  # the test's own client: drop dead connections
    prices = [fields[b"ts"] for _, fields in await redis.xrange("ticks.received")]
    assert prices == [b"1714564801000000", b"1714564803000000"]


# -- health, metrics, OpenAPI -------------------------------------------------------------


async def test_readyz_and_healthz(client: Client) -> None:
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok"
    assert isinstance(health["pid"], int)


async def test_metrics_count_by_token_and_reason(client: Client) -> None:
    await client.post("/ingest/ticks", json=[tick_at(1), tick_at(2), tick_at(3)], headers=AUTH)
    await client.post("/ingest/tick", json={**GOOD, "price": -1}, headers=AUTH)
    await client.post("/ingest/tick", json=GOOD)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'tickpipe_ingest_ticks_accepted_total{token="feeder-a"}' in text
    assert (
        'tickpipe_ingest_requests_rejected_total{reason="invalid_field",token="feeder-a"}' in text
    )
    assert (
        'tickpipe_ingest_requests_rejected_total{reason="unauthorized",token="anonymous"}' in text
    )
    assert 'tickpipe_ingest_request_seconds_bucket{endpoint="/ingest/ticks"' in text
    assert "tickpipe_ingest_batch_ticks_bucket" in text
    assert "tickpipe_ingest_backlog_entries" in text
    assert TOKEN not in text


async def test_redis_refusing_writes_gives_503(client: Client, redis: Redis) -> None:
    await redis.config_set("maxmemory", "1")
    try:
        batch = [tick_at(s) for s in range(50)]
        response = await client.post("/ingest/ticks", json=batch, headers=AUTH)
        assert response.status == 503
        body = await response.json()
        assert body["error"] == "redis_unavailable"
        assert "maxmemory" in body["detail"]
    finally:
        await redis.config_set("maxmemory", "0")
    assert await redis.xlen("ticks.received") == 0


async def test_an_internal_error_is_a_json_500(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(body: bytes) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr("ingest.app.decode_tick", broken)
    async with make_client() as client:
        response = await client.post("/ingest/tick", json=GOOD, headers=AUTH)
        assert response.status == 500
        assert await response.json() == {
            "error": "internal_error",
            "detail": "an internal error occurred; see the log",
        }
    assert "a defect" in caplog.text


async def test_latest_holds_any_source_exactly(client: Client, redis: Redis) -> None:
    source = 'quote " backslash \\ slash / ünïcode ☃ tab-free'
    response = await client.post("/ingest/tick", json=tick_at(1, source=source), headers=AUTH)
    assert response.status == 200
    assert json.loads(await redis.hget("ticks:latest", "AAPL"))["source"] == source
    latest = await client.get("/ticks/AAPL/latest", headers=AUTH)
    assert (await latest.json())["source"] == source


async def test_latest_written_in_another_key_order_is_still_compared_by_ts(
    client: Client, redis: Redis
) -> None:
    # Values of earlier versions (cjson's key order) are read for their ts as well.
    older = {"price": "1", "id": "1-0", "source": "x", "volume": "0", "ts": "1714564801000000"}
    await redis.hset("ticks:latest", "AAPL", json.dumps(older))
    response = await client.post("/ingest/tick", json=tick_at(0, price="2"), headers=AUTH)
    assert response.status == 200
    assert json.loads(await redis.hget("ticks:latest", "AAPL"))["price"] == "1"
    response = await client.post("/ingest/tick", json=tick_at(2, price="3"), headers=AUTH)
    assert json.loads(await redis.hget("ticks:latest", "AAPL"))["price"] == "3"
