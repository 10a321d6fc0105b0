"""The flusher against real Redis and Postgres."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from redis.asyncio import Redis

from flusher.db import Row, TickStore, last_per_key
from flusher.stream import ShardedStream
from flusher.worker import Flusher
from ingest.writer import TickWriter
from tickpipe.settings import Settings
from tickpipe.ticks import Tick


def tick(symbol: str, ts_us: int, price: str, source: str = "test") -> Tick:
    return Tick(symbol, ts_us, Decimal(price), Decimal("1"), source)


def test_last_per_key_keeps_the_last_entry_and_sorts() -> None:
    rows = [
        Row("1-0", tick("B", 2, "1")),
        Row("1-1", tick("A", 5, "2")),
        Row("1-2", tick("B", 2, "3")),
        Row("2-0", tick("A", 1, "4")),
    ]
    assert last_per_key(rows) == [rows[3], rows[1], rows[2]]


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
async def test_upsert_replaces_by_stream_order_and_replays_harmlessly(
    store: TickStore, pg: asyncpg.Connection
) -> None:
    await store.upsert(
        [Row("5-0", tick("A", 1, "1.10")), Row("5-1", tick("B", 1, "2.000000000000000001"))]
    )
    await store.upsert([Row("7-0", tick("A", 1, "1.20"))])  # a later version: replaces
    version = await pg.fetchval("SELECT xmin::text FROM md_ticks WHERE symbol = 'A'")
    await store.upsert([Row("7-0", tick("A", 1, "1.20"))])  # a replay after COMMIT-before-XACK
    await store.upsert([Row("6-9", tick("A", 1, "9.99"))])  # an older version, committed late
    assert await pg.fetchval("SELECT xmin::text FROM md_ticks WHERE symbol = 'A'") == version
    assert await rows(pg) == [
        ("A", Decimal("1.20"), Decimal(1), "test"),
        ("B", Decimal("2.000000000000000001"), Decimal(1), "test"),
    ]
    assert await pg.fetchval("SELECT stream_id FROM md_ticks WHERE symbol = 'A'") == "7-0"
    # Sequence numbers compare as numbers, not text.
    await store.upsert([Row("7-10", tick("A", 1, "1.30"))])
    await store.upsert([Row("7-9", tick("A", 1, "1.40"))])
    assert (await rows(pg))[0][1] == Decimal("1.30")


async def make_flusher(
    redis: Redis, store: TickStore, settings: Settings, consumer: str = "f1"
) -> Flusher:
    return Flusher(
        ShardedStream.for_consumer(redis, settings, consumer), store, settings, burst=True
    )


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
    latest = {t.key: t for t in sent}
    assert await rows(pg) == [
        (t.symbol, t.price, t.volume, t.source) for _, t in sorted(latest.items())
    ]
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
    crashed = (await make_flusher(redis, store, settings, consumer="f1")).streams.shards[0]
    await crashed.ensure_group()
    delivered = await crashed.read_new(10, None)  # delivered, then the process "dies"
    assert len(delivered) == 10
    assert (await redis.xpending(settings.stream_name, settings.group_name))["pending"] == 10

    restarted = await make_flusher(redis, store, settings, consumer="f1")
    await restarted.run()
    assert len(await rows(pg)) == 10
    assert (await redis.xpending(settings.stream_name, settings.group_name))["pending"] == 0


async def deliver(redis: Redis, consumer: str, count: int) -> list[str]:
    reply = await redis.xreadgroup("flushers", consumer, {"ticks.received": ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in reply[0][1]]


@pytest.mark.services
async def test_trim_never_drops_a_pending_entry(
    redis: Redis, store: TickStore, settings: Settings
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("T", i, "1") for i in range(1, 101)])
    flusher = await make_flusher(redis, store, settings, consumer="trimmer")
    await flusher.streams.shards[0].ensure_group()
    acked_early = await deliver(redis, "y", 50)
    await redis.xack("ticks.received", "flushers", *acked_early)
    still_pending = await deliver(redis, "x", 30)  # a slow or dead consumer holds these
    acked_late = await deliver(redis, "y", 20)
    await redis.xack("ticks.received", "flushers", *acked_late)

    # No retention: everything acknowledged may go, but nothing from the oldest pending on.
    trimmed = await flusher.streams.shards[0].trim(floor_now())
    assert trimmed.by_age == 50
    assert trimmed.safe_id == still_pending[0]
    remaining = [i.decode() for i, _ in await redis.xrange("ticks.received")]
    assert remaining == still_pending + acked_late
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 30


@pytest.mark.services
async def test_trim_keeps_what_another_group_has_not_read(
    redis: Redis, store: TickStore, settings: Settings
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("T", i, "1") for i in range(1, 11)])
    flusher = await make_flusher(redis, store, settings)
    await flusher.streams.shards[0].ensure_group()
    await redis.xack("ticks.received", "flushers", *await deliver(redis, "y", 10))
    await redis.xgroup_create("ticks.received", "archiver", id="0")
    trimmed = await flusher.streams.shards[0].trim(floor_now())
    assert (trimmed.total, trimmed.safe_id) == (0, "0-1")
    assert await redis.xlen("ticks.received") == 10


@pytest.mark.services
async def test_trim_keeps_the_retention_window(
    redis: Redis, store: TickStore, settings: Settings
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("T", i, "1") for i in range(1, 11)])
    flusher = await make_flusher(redis, store, settings)
    await flusher.streams.shards[0].ensure_group()
    await redis.xack("ticks.received", "flushers", *await deliver(redis, "y", 10))
    await flusher.upkeep()  # STREAM_RETENTION_S is an hour: all of it is recent
    assert await redis.xlen("ticks.received") == 10


def floor_now() -> str:
    """A retention floor in the future: retention allows trimming everything acknowledged."""
    return f"{int(time.time() * 1000) + 1000}-0"


@pytest.mark.services
async def test_idle_consumers_are_deleted_only_without_pending(
    redis: Redis, store: TickStore, settings: Settings
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("C", i, "1") for i in range(1, 5)])
    flusher = await make_flusher(redis, store, settings, consumer="keeper")
    await flusher.streams.shards[0].ensure_group()
    done = await deliver(redis, "finished", 2)
    await redis.xack("ticks.received", "flushers", *done)
    await deliver(redis, "holding", 2)
    await redis.xgroup_createconsumer("ticks.received", "flushers", "keeper")
    assert await flusher.streams.shards[0].delete_idle_consumers(0) == ["finished"]
    names = {c["name"] for c in await redis.xinfo_consumers("ticks.received", "flushers")}
    assert names == {b"holding", b"keeper"}


@pytest.mark.services
async def test_entries_deleted_while_pending_are_counted_lost(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    ids = await writer.append([tick("L", i, "1") for i in range(1, 11)])
    flusher = await make_flusher(redis, store, settings, consumer="rescuer")
    await flusher.streams.shards[0].ensure_group()
    await deliver(redis, "crashed", 10)
    await redis.xdel("ticks.received", *ids[:3])
    await asyncio.sleep(0.05)  # idle for longer than the claim threshold below
    rescuer = await make_flusher(
        redis, store, settings.replace(flush_claim_idle_s=0.001), consumer="rescuer"
    )
    await rescuer.run()  # burst: one reclaim pass, then drain
    assert rescuer.lost == 3
    assert int(await redis.get("ticks:lost")) == 3
    assert len(await rows(pg)) == 7
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 0


@pytest.mark.services
async def test_entry_that_is_not_utf8_is_dead_lettered_with_its_bytes(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("U", 1, "1")])
    bad_id = await redis.xadd(
        "ticks.received",
        {"symbol": "U", "ts": "2", "price": "1", "volume": "1", "source": b"\xff\xfe"},
    )
    await writer.append([tick("U", 3, "1")])
    flusher = await make_flusher(redis, store, settings)
    await flusher.run()
    assert len(await rows(pg)) == 2
    [(_, letter)] = await redis.xrange("ticks.dead")
    assert letter[b"original_id"] == bad_id
    assert letter[b"field:source"] == b"\xff\xfe"
    assert b"UTF-8" in letter[b"reason"]
    assert letter[b"deliveries"] == b"1"
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 0


@pytest.mark.services
async def test_undecodable_entries_are_dead_lettered_on_their_first_delivery(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    """A decode error is permanent: no FLUSH_MAX_DELIVERIES retries, FLUSH_CLAIM_IDLE_S apart."""
    assert settings.flush_max_deliveries == 5
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    good = [tick("G", i, f"{i}.5") for i in range(1, 7)]
    await writer.append(good[:2])
    bad = {
        # written by something other than ingest
        await redis.xadd("ticks.received", {"symbol": "x"}): b"lacks field 'ts'",
        await redis.xadd(
            "ticks.received",
            {"symbol": "G", "ts": "9", "price": "lots", "volume": "1", "source": "s"},
        ): b"price is not a decimal number",
    }
    await writer.append(good[2:4])
    bad[
        await redis.xadd(
            "ticks.received",
            {"symbol": "G", "ts": "10", "price": "1" * 79, "volume": "1", "source": "s"},
        )
    ] = b"price is out of range"
    await writer.append(good[4:])
    flusher = await make_flusher(redis, store, settings)
    await flusher.run()  # one run: one delivery of each entry
    assert await rows(pg) == [(t.symbol, t.price, t.volume, t.source) for t in good]
    letters = {fields[b"original_id"]: fields for _, fields in await redis.xrange("ticks.dead")}
    assert letters.keys() == bad.keys()
    for entry_id, reason in bad.items():
        assert letters[entry_id][b"reason"].startswith(b"undecodable: ")
        assert reason in letters[entry_id][b"reason"]
        assert letters[entry_id][b"deliveries"] == b"1"
    assert letters[next(iter(bad))][b"field:symbol"] == b"x"
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 0
    assert (flusher.dead_lettered, flusher.dead_lettered_to, flusher.left_pending) == (
        3,
        {"ticks.dead": 3},
        0,
    )
    assert flusher.entries_acked == 9


@pytest.mark.services
async def test_a_row_postgres_rejects_is_retried_before_it_is_dead_lettered(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    """Unlike a decode error, a rejection may go away (a constraint fixed): it stays pending."""
    await pg.execute("ALTER TABLE md_ticks ADD CONSTRAINT test_cap CHECK (price < 100)")
    try:
        writer = TickWriter(redis, settings.stream_name, settings.latest_key)
        await writer.append([tick("R", 1, "1"), tick("R", 2, "150"), tick("R", 3, "3")])
        flusher = await make_flusher(redis, store, settings)
        await flusher.run()
        assert [r[1] for r in await rows(pg)] == [Decimal(1), Decimal(3)]  # bisected
        assert await redis.xlen("ticks.dead") == 0
        assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 1
        assert (flusher.dead_lettered, flusher.left_pending) == (0, 1)
    finally:
        await pg.execute("ALTER TABLE md_ticks DROP CONSTRAINT test_cap")
    again = await make_flusher(redis, store, settings)  # the same consumer: reads it again
    await again.run()
    assert [r[1] for r in await rows(pg)] == [Decimal(1), Decimal(150), Decimal(3)]
    assert (again.dead_lettered, again.left_pending) == (0, 0)


@pytest.mark.services
async def test_upkeep_publishes_pending_and_lag_and_trims_by_retention(
    redis: Redis, store: TickStore, settings: Settings
) -> None:
    from prometheus_client import REGISTRY

    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("G", i, "1") for i in range(1, 11)])
    flusher = await make_flusher(redis, store, settings.replace(stream_retention_s=0))
    await flusher.streams.shards[0].ensure_group()
    await redis.xack("ticks.received", "flushers", *await deliver(redis, "fast", 5))
    await deliver(redis, "slow", 3)  # pending 3, lag 2
    await flusher.upkeep()
    assert REGISTRY.get_sample_value("tickpipe_flusher_pending") == 3
    assert REGISTRY.get_sample_value("tickpipe_flusher_lag") == 2
    assert await redis.xlen("ticks.received") == 5  # the acknowledged 5 are gone


@pytest.mark.services
async def test_dead_letter_and_lost_count_are_safe_to_retry(
    redis: Redis, store: TickStore, settings: Settings
) -> None:
    """A retry after a lost reply must add no second dead letter and count no loss twice."""
    from flusher.stream import DeadLetter, Entry

    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    [entry_id] = await writer.append([tick("D", 1, "1")])
    flusher = await make_flusher(redis, store, settings)
    await flusher.streams.shards[0].ensure_group()
    [delivered] = await flusher.streams.shards[0].read_new(1, None)
    letter = DeadLetter(Entry(entry_id, delivered.fields), "test", 5)
    assert await flusher.streams.shards[0].dead_letter([letter]) == 1
    assert await flusher.streams.shards[0].dead_letter([letter]) == 0  # the retry
    assert await redis.xlen("ticks.dead") == 1
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 0

    assert await flusher.streams.shards[0].count_lost(["9-1", "9-2"]) == 2
    assert await flusher.streams.shards[0].count_lost(["9-1", "9-2"]) == 2  # the retry
    assert await redis.smembers("ticks:lost:ids") == {b"9-1", b"9-2"}
