"""The flusher against real Redis and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from redis.asyncio import Redis

from flusher.db import TickStore, last_per_key
from flusher.stream import TickStream
from flusher.worker import Flusher
from ingest.writer import TickWriter
from tickpipe.settings import Settings
from tickpipe.ticks import Tick


def tick(symbol: str, ts_us: int, price: str, source: str = "test") -> Tick:
    return Tick(symbol, ts_us, Decimal(price), Decimal("1"), source)


def test_last_per_key_keeps_the_last_entry_and_sorts() -> None:
    ticks = [tick("B", 2, "1"), tick("A", 5, "2"), tick("B", 2, "3"), tick("A", 1, "4")]
    assert last_per_key(ticks) == [tick("A", 1, "4"), tick("A", 5, "2"), tick("B", 2, "3")]


@pytest.fixture
async def store(settings: Settings, pg: asyncpg.Connection) -> AsyncIterator[TickStore]:
    tick_store = await TickStore.open(settings.database_url)
    yield tick_store
    await tick_store.close()


async def rows(pg: asyncpg.Connection) -> list[tuple[str, Decimal, Decimal, str]]:
    records = await pg.fetch(
        "SELECT symbol, price, volume, source FROM md_ticks ORDER BY symbol, ts"
    )
    return [(r["symbol"], r["price"], r["volume"], r["source"]) for r in records]


@pytest.mark.services
async def test_upsert_replaces_and_replays_harmlessly(
    store: TickStore, pg: asyncpg.Connection
) -> None:
    await store.upsert([tick("A", 1, "1.10"), tick("B", 1, "2.000000000000000001")])
    await store.upsert([tick("A", 1, "1.20")])
    await store.upsert([tick("A", 1, "1.20")])  # a replay after COMMIT-before-XACK
    assert await rows(pg) == [
        ("A", Decimal("1.20"), Decimal(1), "test"),
        ("B", Decimal("2.000000000000000001"), Decimal(1), "test"),
    ]


async def make_flusher(
    redis: Redis, store: TickStore, settings: Settings, consumer: str = "f1"
) -> Flusher:
    stream = TickStream(
        redis,
        settings.stream_name,
        settings.group_name,
        consumer,
        dead_stream=settings.dead_stream_name,
        lost_key=settings.lost_key,
    )
    return Flusher(stream, store, settings, burst=True)


@pytest.mark.services
async def test_burst_writes_every_entry_then_acks(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    sent = [tick(f"S{i % 7}", i, f"{i}.{i:04d}") for i in range(1, 501)]
    await writer.append(sent[:250])
    flusher = await make_flusher(redis, store, settings)
    await writer.append(sent[250:])
    await flusher.run()
    assert await rows(pg) == [(t.symbol, t.price, t.volume, t.source) for t in last_per_key(sent)]
    pending = await redis.xpending(settings.stream_name, settings.group_name)
    assert pending["pending"] == 0
    assert flusher.entries_acked == 500


@pytest.mark.services
async def test_duplicate_keys_in_one_batch_last_value_wins(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("K", 1, "1"), tick("K", 1, "2"), tick("K", 1, "3")])
    flusher = await make_flusher(redis, store, settings)
    await flusher.run()
    assert await rows(pg) == [("K", Decimal(3), Decimal(1), "test")]


@pytest.mark.services
async def test_restart_drains_own_pending_first(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("P", i, "1") for i in range(1, 11)])
    crashed = (await make_flusher(redis, store, settings, consumer="f1")).stream
    await crashed.ensure_group()
    delivered = await crashed.read_new(10, None)  # delivered, then the process "dies"
    assert len(delivered) == 10
    assert (await redis.xpending(settings.stream_name, settings.group_name))["pending"] == 10

    restarted = await make_flusher(redis, store, settings, consumer="f1")
    await restarted.run()
    assert len(await rows(pg)) == 10
    assert (await redis.xpending(settings.stream_name, settings.group_name))["pending"] == 0
