"""The whole path: HTTP -> ingest -> stream -> flusher -> md_ticks."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from flusher.run import run_flusher
from ingest.app import create_app
from ingest.hubs import decode_entries
from tickpipe.core.settings import Settings
from tickpipe.lab.feeder import wait_ready
from tickpipe.lab.processes import Processes
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TICK = {
    "symbol": "EURUSD",
    "ts": "2024-05-01T12:00:00.000001+00:00",
    "price": "1.072510000000000001",
    "volume": "1500000.50",
    "source": "ecn-1",
}


async def test_posted_tick_lands_exactly_and_is_acknowledged(
    settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post("/ingest/tick", json=TICK, headers=AUTH)
        assert response.status == 200
    await run_flusher(settings, burst=True)
    row = await pg.fetchrow("SELECT * FROM md_ticks")
    assert row is not None
    assert row["symbol"] == "EURUSD"
    assert row["price"] == Decimal("1.072510000000000001")
    assert str(row["price"]) == "1.072510000000000001"
    assert row["volume"] == Decimal("1500000.50")
    assert row["ts"].isoformat() == "2024-05-01T12:00:00.000001+00:00"
    assert row["source"] == "ecn-1"
    pending = await redis.xpending(settings.stream_name, settings.group_name)
    assert pending["pending"] == 0


UINT256_MAX = str(2**256 - 1)
"""78 digits: the largest on-chain quantity in base units (wei)."""


async def test_78_digit_decimals_stay_exact_from_post_to_every_read(
    settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    price = "9" * 78 + "." + "1" * 18
    expanded = "15" + "0" * 76  # 1.5E+77
    lines = [
        # JSON numbers, written into the body verbatim: no float anywhere
        f'{{"symbol":"WEI","ts":1714564800000,"price":{price},"volume":{UINT256_MAX},'
        '"source":"chain"}',
        # decimal strings, one with an exponent within range
        f'{{"symbol":"WEI","ts":1714564800001,"price":"1.5E+77","volume":"{UINT256_MAX}",'
        '"source":"chain"}',
    ]
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.post(
            "/ingest/ticks",
            data="\n".join(lines).encode(),
            headers={**AUTH, "Content-Type": "application/x-ndjson"},
        )
        assert response.status == 200, await response.text()
        entries = await redis.xrange(settings.stream_name)
        assert [(f[b"price"].decode(), f[b"volume"].decode()) for _, f in entries] == [
            (price, UINT256_MAX),
            (expanded, UINT256_MAX),
        ]
        [first, second] = [json.loads(event.data) for event in decode_entries(entries)]  # SSE
        assert (first["price"], second["price"], second["volume"]) == (
            price,
            expanded,
            UINT256_MAX,
        )
        from_hash = await (await client.get("/ticks/WEI/latest", headers=AUTH)).json()
        assert (from_hash["origin"], from_hash["price"], from_hash["volume"]) == (
            "stream",
            expanded,
            UINT256_MAX,
        )

        await run_flusher(settings, burst=True)
        stored = await pg.fetch("SELECT price::text, volume::text FROM md_ticks ORDER BY ts")
        assert [tuple(row) for row in stored] == [(price, UINT256_MAX), (expanded, UINT256_MAX)]
        assert await pg.fetchval("SELECT volume FROM md_ticks LIMIT 1") == Decimal(UINT256_MAX)

        history = await (await client.get("/ticks/WEI?limit=10", headers=AUTH)).json()
        assert [(t["price"], t["volume"]) for t in history["ticks"]] == [
            (expanded, UINT256_MAX),
            (price, UINT256_MAX),
        ]
        await redis.delete(settings.latest_key)
        from_store = await (await client.get("/ticks/WEI/latest", headers=AUTH)).json()
        assert (from_store["origin"], from_store["price"], from_store["volume"]) == (
            "store",
            expanded,
            UINT256_MAX,
        )


@pytest.fixture
def processes() -> Iterator[Processes]:
    with Processes() as started:
        yield started


async def test_real_processes_ingest_and_flusher(
    subprocess_env: dict[str, str],
    redis: Redis,
    pg: asyncpg.Connection,
    processes: Processes,
) -> None:
    port = free_port()
    env = {**subprocess_env, "INGEST_PORT": str(port)}
    processes.tickpipe("ingest", ["ingest"], env)
    flusher = processes.tickpipe("flusher", ["flusher", "run", "--consumer", "proc-flusher"], env)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(f"{base}/readyz", 30.0)

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/ingest/tick", json=TICK, headers=AUTH) as response,
    ):
        assert response.status == 200, await response.text()

    # The flusher runs with FLUSH_INTERVAL_S=0.1; allow generous time on a loaded machine.
    deadline = time.monotonic() + 30
    price = None
    while price is None and time.monotonic() < deadline:
        price = await pg.fetchval("SELECT price FROM md_ticks WHERE symbol = 'EURUSD'")
        await asyncio.sleep(0.05)
    assert price == Decimal("1.072510000000000001")

    flusher.send_signal(signal.SIGTERM)
    assert flusher.wait(timeout=30) == 0
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 0


async def test_flusher_without_md_ticks_says_what_to_do(
    subprocess_env: dict[str, str], redis: Redis, stack: LocalStack
) -> None:
    from tickpipe.core.schema import ensure_database

    bare = stack.database_url.rsplit("/", 1)[0] + "/tickpipe_bare"
    await ensure_database(bare)
    async with TestClient(TestServer(create_app(Settings.from_env(subprocess_env)))) as client:
        assert (await client.post("/ingest/tick", json=TICK, headers=AUTH)).status == 200
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tickpipe", "flusher", "run", "--burst"],
        env={**subprocess_env, "DATABASE_URL": bare},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "tickpipe schema apply" in result.stderr
    assert "Traceback" not in result.stderr
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 1
