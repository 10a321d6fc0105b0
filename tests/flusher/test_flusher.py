"""The flusher against real Redis and Postgres."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from redis.asyncio import Redis

from flusher.db import Row, StagedRows, TickStore, entry_key, last_per_key, staged_row
from flusher.stream import ShardedStream
from flusher.worker import Flusher
from ingest.writer import TickWriter
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick, to_fields


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


def flat(fields: dict[str, str]) -> list[bytes]:
    return [part.encode() for pair in fields.items() for part in pair]


def test_entries_ingest_writes_are_staged_without_a_tick_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ingest's entries take the short path (bytes in, COPY text out), and it stages
    them exactly as the careful path, which decodes a Tick, would."""
    import flusher.db

    big = "9" * 78 + "." + "9" * 18
    ticks = [
        Tick("A", 0, Decimal("0.000000000000000001"), Decimal(0), "s"),
        # The largest ts it takes: one more digit (after the year 5138) is checked carefully.
        Tick("Z9._:/-" + "x" * 25, 10**17 - 1, Decimal(big), Decimal(big), "~" * 64),
        Tick("EURUSD", 1_714_564_800_000_001, Decimal("1.50"), Decimal("0.0000000"), "ecn 1"),
        Tick("W", 2**53 + 1, Decimal(2**256 - 1), Decimal("1E+3"), "Börse €😀"),
    ]
    entries = [flat(to_fields(t)) for t in ticks]
    careful = {staged_row(f"5-{i}", t) for i, t in enumerate(ticks)}

    def no_tick(fields: object) -> None:
        raise AssertionError(f"took the careful path: {fields!r}")

    monkeypatch.setattr(flusher.db, "from_fields", no_tick)
    staged = StagedRows.of([([f"5-{i}".encode() for i in range(len(ticks))], entries)])
    assert staged.skipped == []
    assert set(staged.rows.items()) == careful
    assert staged.text() == b"".join(line + b"\n" for line in staged.rows.values())


def test_staging_keeps_the_last_entry_of_a_key_and_sets_aside_the_rest() -> None:
    ids = [b"1-0", b"1-1", b"1-2", b"1-3", b"1-4", b"1-5"]
    fields: list[list[bytes] | None] = [
        flat({"symbol": "K", "ts": "5", "price": "1", "volume": "1", "source": "s"}),
        None,  # deleted while pending
        # the same key, written otherwise (another order, a leading zero): the last wins
        flat({"ts": "05", "symbol": "K", "source": "s", "volume": "2", "price": "2.0"}),
        flat({"symbol": "K", "ts": "6", "price": "0", "volume": "1", "source": "s"}),
        flat({"symbol": "K", "ts": "7", "price": "1", "volume": "1", "source": "a\\b"}),
        flat({"symbol": "K", "ts": "8", "price": "1", "volume": "1"}),
    ]
    staged = StagedRows.of([([b"0-1"], [fields[0]]), (ids, fields)])
    assert staged.rows == {
        (b"K", b"5"): b"K\t5\t2.0\t2\ts\t1-2",
        (b"K", b"7"): b"K\t7\t1\t1\ta\\\\b\t1-4",  # COPY text escapes the backslash
    }
    assert staged.skipped == [
        (1, 1, None),
        (1, 3, "price must be > 0"),
        (1, 5, "stream entry lacks field 'source'"),
    ]
    assert entry_key(b"1-2", fields[2]) == (b"K", b"5")
    assert entry_key(b"1-3", fields[3]) is None
    # An undecodable entry, even in ingest's order of fields, never replaces its key's row.
    good = flat({"symbol": "K", "ts": "9", "price": "1", "volume": "1", "source": "s"})
    bad = flat({"symbol": "K", "ts": "9", "price": "abc", "volume": "1", "source": "s"})
    staged = StagedRows.of([([b"2-0", b"2-1"], [good, bad])])
    assert staged.rows == {(b"K", b"9"): b"K\t9\t1\t1\ts\t2-0"}
    assert staged.skipped == [(0, 1, "price is not a decimal number: 'abc'")]


def test_the_short_path_takes_a_source_exactly_when_the_tick_rules_do() -> None:
    """Sources in UTF-8 are checked on their bytes: the same verdict as decoding them and
    applying check_source (the backslash, escaped for COPY, takes the careful path)."""
    import random

    from flusher.db import _CANONICAL_ROW
    from tickpipe.core.ticks import TickError, check_source

    pieces = [
        *(chr(c).encode() for c in range(0x80)),
        *(c.encode() for c in "é\u00a0\u0085\u009f\u00ff€\ud7ff\ue000\uffff😀\U0010ffff"),
        b"\xed\xa0\x80",  # a surrogate
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
        b"\xc0\x80",  # overlong
        b"\xe0\x80\x80",
        b"\xf0\x80\x80\x80",
        b"\x80",  # a lone continuation byte
        b"\xe2\x82",  # cut short
        b"\xff",
    ]

    def valid(source: bytes) -> bool:
        try:
            check_source(source.decode())
        except (UnicodeDecodeError, TickError):
            return False
        return b"\\" not in source

    # Mostly characters a source may hold, so that long valid ones come up too.
    weights = [1.0 if valid(piece) else 0.02 for piece in pieces]
    rng = random.Random(7)
    seen = set()
    for _ in range(20_000):
        length = rng.choice([1, 2, 5, 63, 64, 65, 70])
        source = b"".join(rng.choices(pieces, weights, k=length))
        row = b"S\t1\t1\t1\t" + source + b"\t1-0"
        assert (_CANONICAL_ROW.fullmatch(row) is not None) == valid(source), source
        seen.add((valid(source), source.isascii(), len(source.decode(errors="replace"))))
    assert {(True, False, 64), (False, False, 64), (False, False, 65), (True, True, 64)} <= seen


@pytest.mark.services
async def test_rows_hold_the_values_sent_digit_for_digit_and_to_the_microsecond(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    from tickpipe.core.ticks import MAX_TS_US, datetime_to_us

    big = "9" * 78 + "." + "9" * 18
    sent = [
        Tick("WEI", 1_714_564_800_000_001, Decimal(big), Decimal(2**256 - 1), "chain"),
        Tick("WEI", 2**53 + 1, Decimal("1" + "0" * 77), Decimal("0.000000000000000001"), "c"),
        Tick("WEI", MAX_TS_US, Decimal("0.000000000000000001"), Decimal("0.00"), "c"),
        Tick("WEI", 0, Decimal("1.10"), Decimal(0), "Börse \\ 1"),
    ]
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    ids = await writer.append(sent)
    flusher = await make_flusher(redis, store, settings)
    await flusher.run()
    stored = await pg.fetch(
        "SELECT ts, price::text, volume::text, source, stream_id FROM md_ticks ORDER BY ts"
    )
    assert [
        (datetime_to_us(r["ts"]), r["price"], r["volume"], r["source"], r["stream_id"])
        for r in stored
    ] == sorted(
        (t.ts_us, format(t.price, "f"), format(t.volume, "f"), t.source, entry_id)
        for t, entry_id in zip(sent, ids, strict=True)
    )
    assert [r["ts"].isoformat() for r in stored][-1] == "9999-12-31T23:59:59.999999+00:00"
    assert (flusher.rows_written, flusher.entries_acked, flusher.dead_lettered) == (4, 4, 0)


@pytest.mark.services
async def test_entries_written_by_hand_with_bad_values_are_dead_lettered_never_stored(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    good = {"symbol": "H", "ts": "1", "price": "1", "volume": "1", "source": "s"}
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("H", 100, "1")])
    bad: dict[str, dict[str, str | bytes]] = {
        "price is not a decimal number": {**good, "price": "abc"},
        "price must be > 0 ": {**good, "price": "-1"},
        "price must be > 0": {**good, "price": "0.000"},
        "price must be a finite number": {**good, "price": "NaN"},
        "price is out of range": {**good, "price": "1." + "1" * 19},
        "volume must be >= 0": {**good, "volume": "-0.5"},
        "malformed ts": {**good, "ts": "x"},
        "ts is out of range": {**good, "ts": "-5"},
        "ts is out of range ": {**good, "ts": "9" * 18},
        "invalid symbol": {**good, "symbol": "A B"},
        "invalid symbol ": {**good, "symbol": "S" * 33},
        "source must not contain control characters": {**good, "source": "a\tb"},
        "source must be 1 to 64 characters": {**good, "source": "s" * 65},
        "lacks field 'volume'": {k: v for k, v in good.items() if k != "volume"},
        "unexpected fields ['extra']": {**good, "extra": "1"},
        "not valid UTF-8": {**good, "symbol": b"\xc3\x28"},
    }
    ids = {}
    for reason, fields in bad.items():
        ids[await redis.xadd(settings.stream_name, fields)] = reason.strip().encode()  # type: ignore[arg-type]
    await writer.append([tick("H", 101, "2")])
    flusher = await make_flusher(redis, store, settings)
    await flusher.run()  # one run: one delivery of each entry
    assert [r[1] for r in await rows(pg)] == [Decimal(1), Decimal(2)]
    letters = {f[b"original_id"]: f for _, f in await redis.xrange("ticks.dead")}
    assert letters.keys() == ids.keys()
    for entry_id, reason in ids.items():
        assert reason in letters[entry_id][b"reason"], (reason, letters[entry_id][b"reason"])
        assert letters[entry_id][b"deliveries"] == b"1"
    assert (await redis.xpending("ticks.received", "flushers"))["pending"] == 0
    assert (flusher.dead_lettered, flusher.rows_written) == (len(bad), 2)


@pytest.mark.services
async def test_postgres_keeps_the_tick_rules_for_rows_written_by_other_means(
    pg: asyncpg.Connection,
) -> None:
    insert = "INSERT INTO md_ticks VALUES ($1, now(), $2::numeric, $3::numeric, $4)"
    await pg.execute(insert, "S" * 32, "9" * 78 + "." + "9" * 18, "0", "é" * 64)
    for values, rule in [
        (("A B", "1", "1", "s"), "md_ticks_symbol_check"),
        (("S" * 33, "1", "1", "s"), "md_ticks_symbol_check"),
        (("A\n", "1", "1", "s"), "md_ticks_symbol_check"),
        (("A", "0", "1", "s"), "md_ticks_price_check"),
        (("A", "1" + "0" * 78, "1", "s"), "md_ticks_price_check"),
        (("A", "1." + "0" * 19, "1", "s"), "md_ticks_price_check"),
        (("A", "NaN", "1", "s"), "md_ticks_price_check"),
        (("A", "1", "-1", "s"), "md_ticks_volume_check"),
        (("A", "1", "Infinity", "s"), "md_ticks_volume_check"),
        (("A", "1", "1", ""), "md_ticks_source_check"),
        (("A", "1", "1", "s" * 65), "md_ticks_source_check"),
        (("A", "1", "1", "a\x85"), "md_ticks_source_check"),
    ]:
        with pytest.raises(asyncpg.CheckViolationError, match=rule):
            await pg.execute(insert, *values)


async def feed(redis: Redis, settings: Settings, per_s: float, seconds: float) -> int:
    """Ticks at about ``per_s`` for ``seconds``, a few at a time as ingest writes them."""
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    sent = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * per_s) + 1 - sent
            if due > 0:
                await writer.append([tick("R", sent + i + 1, "1") for i in range(due)])
                sent += due
            await asyncio.sleep(0.005)
    finally:
        await writer.close()
    return sent


@pytest.mark.services
@pytest.mark.parametrize("per_s", [40, 400, 4000])
async def test_a_batch_takes_at_most_three_reads_and_commits_within_the_interval(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection, per_s: int
) -> None:
    """No polling: after the first entries, one read when the batch should be full."""
    from prometheus_client import REGISTRY

    interval_s, size = 0.4, 200
    settings = settings.replace(flush_interval_s=interval_s, flush_batch_size=size)
    flusher = Flusher(ShardedStream.for_consumer(redis, settings, "lingers"), store, settings)
    reads_before = REGISTRY.get_sample_value("tickpipe_flusher_reads_total") or 0.0
    running = asyncio.create_task(flusher.run())
    await asyncio.sleep(0.1)  # its first (idle) read
    feeding = asyncio.create_task(feed(redis, settings, per_s, 2.0))
    # Each entry's commit lag: from its id's time to its row's first sighting.
    lags: dict[str, float] = {}
    while not feeding.done() or len(lags) < feeding.result():
        now = time.time()
        for record in await pg.fetch("SELECT stream_id FROM md_ticks"):
            entry_id = record["stream_id"]
            lags.setdefault(entry_id, now - int(entry_id.split("-")[0]) / 1000)
        await asyncio.sleep(0.01)
    flusher.stop()
    await running
    assert max(lags.values()) < interval_s + 1.0  # the interval, plus commits on a busy machine
    assert flusher.batches > 0
    # Besides at most 3 per batch: the idle reads once all is written, until the stop.
    assert flusher.reads <= 3 * flusher.batches + 2, (flusher.reads, flusher.batches)
    if per_s * interval_s > size:  # the rate fills a batch before the interval is over
        assert flusher.batches >= 0.8 * len(lags) / size
    reads_after = REGISTRY.get_sample_value("tickpipe_flusher_reads_total")
    assert reads_after == reads_before + flusher.reads


@pytest.mark.services
async def test_a_stop_ends_the_wait_for_more_entries_at_once(
    redis: Redis, store: TickStore, settings: Settings, pg: asyncpg.Connection
) -> None:
    settings = settings.replace(flush_interval_s=30.0, flush_batch_size=1000)
    flusher = Flusher(ShardedStream.for_consumer(redis, settings, "waits"), store, settings)
    running = asyncio.create_task(flusher.run())
    await asyncio.sleep(0.2)
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    await writer.append([tick("W", 1, "1")])
    await writer.close()
    await asyncio.sleep(0.3)  # read, and waiting for the batch to fill
    assert await pg.fetchval("SELECT count(*) FROM md_ticks") == 0
    stopped_at = time.monotonic()
    flusher.stop()
    await asyncio.wait_for(running, 5)
    assert time.monotonic() - stopped_at < 1.0
    assert await pg.fetchval("SELECT count(*) FROM md_ticks") == 1  # the batch it held
    assert (await redis.xpending(settings.stream_name, settings.group_name))["pending"] == 0
