"""Rollups against the real Postgres: triggers, passes, late ticks, replacements, the CLI.

They run in a database of their own (tickpipe_rollups), so the triggers on its
md_ticks never touch the database the other tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import IO

import asyncpg
import pytest
from click.testing import CliRunner

from flusher.db import Row, TickStore, last_per_key
from tests.conftest import database_url, fresh_database
from tickpipe.cli import main
from tickpipe.core.md_ranges import covering
from tickpipe.core.schema import apply_schema, ensure_database
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import EPOCH, Tick
from tickpipe.lab.stack import LocalStack, free_port
from tickpipe.rollup.store import RollupStore

pytestmark = pytest.mark.services

WIDTHS = (1, 60)
T0 = 1_700_000_040_000_000
"""Epoch microseconds at the start of a minute (2023-11-14T22:14:00Z)."""

Aggregates = dict[tuple[str, dt.datetime, dt.datetime], tuple[Decimal, ...]]


@pytest.fixture
async def rollup_url(stack: LocalStack) -> str:
    """A database with the rollup schema and nothing in it."""
    return await fresh_database(stack, "tickpipe_rollups")


@pytest.fixture
async def db(rollup_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(rollup_url)
    yield conn
    await conn.close()


@pytest.fixture
async def ticks(rollup_url: str) -> AsyncIterator[TickStore]:
    """md_ticks written by the flusher's own code (COPY + INSERT ... ON CONFLICT)."""
    store = await TickStore.open(rollup_url, max_size=2)
    yield store
    await store.close()


@pytest.fixture
async def rollups(rollup_url: str) -> AsyncIterator[RollupStore]:
    store = await RollupStore.open(rollup_url)
    yield store
    await store.close()


def tick(symbol: str, offset_ms: int, price: str, volume: str = "1") -> Tick:
    return Tick(symbol, T0 + offset_ms * 1000, Decimal(price), Decimal(volume), "test")


async def write(store: TickStore, stream_id: str, *batch: Tick) -> None:
    await store.upsert(last_per_key(Row(stream_id, t) for t in batch))


def at(offset_ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=T0 + offset_ms * 1000)


async def drain(rollups: RollupStore, widths: tuple[int, ...] = WIDTHS) -> None:
    while (await rollups.merge_pass(1000, widths)).marks:
        pass


# Written apart from the worker's SQL on purpose (window functions, epoch
# arithmetic instead of date_bin), so the two check each other.
EXPECTED_SQL = """
WITH binned AS (
    SELECT t.symbol, t.ts, t.price, t.volume, w.width_s,
           to_timestamp(floor(extract(epoch FROM t.ts) / w.width_s) * w.width_s) AS lo
    FROM md_ticks t CROSS JOIN unnest($1::bigint[]) AS w(width_s)
),
folded AS (
    SELECT symbol, lo, lo + width_s * interval '1 second' AS hi,
        first_value(price) OVER win AS open, max(price) OVER win AS high,
        min(price) OVER win AS low, last_value(price) OVER win AS close,
        sum(volume) OVER win AS volume, count(*) OVER win AS n
    FROM binned
    WINDOW win AS (PARTITION BY symbol, width_s, lo ORDER BY ts
                   ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
)
SELECT DISTINCT * FROM folded
"""


async def expected(conn: asyncpg.Connection, widths: tuple[int, ...] = WIDTHS) -> Aggregates:
    """Every window of every width, aggregated straight from md_ticks."""
    return {
        (r["symbol"], r["lo"], r["hi"]): (
            r["open"],
            r["high"],
            r["low"],
            r["close"],
            r["volume"],
            Decimal(r["n"]),
        )
        for r in await conn.fetch(EXPECTED_SQL, list(widths))
    }


async def stored(conn: asyncpg.Connection) -> Aggregates:
    """md_ranges as exact decimals."""
    records = await conn.fetch(
        """SELECT symbol, lower("window") AS lo, upper("window") AS hi, agg->>'open' AS open,
                  agg->>'high' AS high, agg->>'low' AS low, agg->>'close' AS close,
                  agg->>'volume' AS volume, agg->'count' AS n
           FROM md_ranges"""
    )
    return {
        (r["symbol"], r["lo"], r["hi"]): tuple(
            Decimal(r[k]) for k in ("open", "high", "low", "close", "volume", "n")
        )
        for r in records
    }


async def marks(conn: asyncpg.Connection) -> list[tuple[str, dt.datetime]]:
    rows = await conn.fetch("SELECT symbol, second_ts FROM md_ranges_dirty ORDER BY id")
    return [(r["symbol"], r["second_ts"]) for r in rows]


# -- the triggers, fired by the flusher's upsert -----------------------------------------


async def test_flusher_upsert_marks_inserted_and_replaced_seconds_only(
    db: asyncpg.Connection, ticks: TickStore
) -> None:
    await write(
        ticks, "5-0", tick("AAPL", 0, "10"), tick("AAPL", 400, "11"), tick("MSFT", 1500, "7")
    )
    assert sorted(await marks(db)) == [("AAPL", at(0)), ("MSFT", at(1000))]

    await db.execute("DELETE FROM md_ranges_dirty")
    await write(ticks, "6-0", tick("AAPL", 400, "12"))  # a later entry: replaces
    assert await marks(db) == [("AAPL", at(0))]

    await db.execute("DELETE FROM md_ranges_dirty")
    await write(ticks, "4-0", tick("AAPL", 400, "13"))  # an earlier entry: changes nothing
    assert await marks(db) == []
    assert await db.fetchval("SELECT price FROM md_ticks WHERE ts = $1", at(400)) == 12


async def test_a_rolled_back_batch_leaves_no_mark(db: asyncpg.Connection) -> None:
    async def insert_then_fail() -> None:
        async with db.transaction():
            await db.execute("INSERT INTO md_ticks VALUES ('AAPL', $1, 1, 1, 'x', '1-0')", at(0))
            assert await marks(db) == [("AAPL", at(0))]  # the trigger did fire
            await db.execute("SELECT 1 / 0")

    with pytest.raises(asyncpg.DivisionByZeroError):
        await insert_then_fail()
    assert await marks(db) == []
    assert await db.fetchval("SELECT count(*) FROM md_ticks") == 0


# -- passes --------------------------------------------------------------------------------


async def test_a_pass_folds_ticks_into_every_width_exactly(
    db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    await write(
        ticks,
        "1-0",
        tick("AAPL", 100, "189.1200", "100"),
        tick("AAPL", 700, "189.5", "0.25"),
        tick("AAPL", 900, "188.99", "3"),
        tick("AAPL", 1200, "190.000000000000000001", "1"),
    )
    result = await rollups.merge_pass(1000, WIDTHS)
    assert (result.marks, result.symbols, result.windows, result.changed) == (2, 1, 3, 3)
    assert await marks(db) == []

    ranges = await stored(db)
    assert ranges == await expected(db)
    second = ranges[("AAPL", at(0), at(1000))]
    assert second == (
        Decimal("189.1200"),
        Decimal("189.5"),
        Decimal("188.99"),
        Decimal("188.99"),
        Decimal("103.25"),
        3,
    )
    minute = ranges[("AAPL", at(0), at(60_000))]
    assert minute[3] == Decimal("190.000000000000000001")  # close, every digit kept
    agg = await db.fetchval('SELECT agg FROM md_ranges WHERE upper("window") = $1', at(1000))
    assert '"open": "189.1200"' in agg  # decimals are JSON strings, the digits as written

    again = await rollups.merge_pass(1000, WIDTHS)
    assert again.marks == 0


async def test_a_late_tick_re_merges_its_window(
    db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    await write(ticks, "1-0", tick("AAPL", 500, "10"), tick("AAPL", 30_000, "11"))
    await drain(rollups)
    before = await stored(db)

    # Committed later, but earlier in time than everything in its minute: the new open.
    await write(ticks, "2-0", tick("AAPL", 100, "9.5", "4"))
    await drain(rollups)
    after = await stored(db)
    assert after == await expected(db)
    minute = ("AAPL", at(0), at(60_000))
    assert before[minute][0] == Decimal(10)
    assert after[minute] == (Decimal("9.5"), 11, Decimal("9.5"), 11, 6, 3)
    assert after[("AAPL", at(0), at(1000))] == (Decimal("9.5"), 10, Decimal("9.5"), 10, 5, 2)


async def test_a_replacement_re_merges_its_window(
    db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    await write(ticks, "1-0", tick("AAPL", 100, "10"), tick("AAPL", 900, "12", "2"))
    await drain(rollups)
    await write(ticks, "2-0", tick("AAPL", 900, "8", "5"))  # the close, replaced
    await drain(rollups)
    ranges = await stored(db)
    assert ranges == await expected(db)
    assert ranges[("AAPL", at(0), at(1000))] == (10, 10, 8, 8, 6, 2)


async def test_moving_a_tick_out_empties_its_old_window(
    db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    await write(ticks, "1-0", tick("AAPL", 100, "10"), tick("AAPL", 61_000, "11"))
    await drain(rollups)
    await db.execute("UPDATE md_ticks SET ts = $1 WHERE ts = $2", at(62_000), at(100))
    await drain(rollups)
    ranges = await stored(db)
    assert ranges == await expected(db)
    assert not [key for key in ranges if key[1] < at(60_000)]


@contextlib.asynccontextmanager
async def held_window(
    url: str, symbol: str, lo: dt.datetime, hi: dt.datetime
) -> AsyncIterator[None]:
    """Make a pass that upserts this window wait inside its recompute statement.

    An uncommitted md_ranges row with the window's key, in a connection of its
    own: the pass, its locks taken and its marks claimed, waits for it until the
    block exits and rolls it back.
    """
    conn = await asyncpg.connect(url)
    transaction = conn.transaction()
    try:
        await transaction.start()
        await conn.execute(
            """INSERT INTO md_ranges (symbol, "window", agg)
               VALUES ($1, tstzrange($2, $3, '[)'), '{}')""",
            symbol,
            lo,
            hi,
        )
        yield
        await transaction.rollback()
    finally:
        await conn.close()


async def waiting_backend(conn: asyncpg.Connection, timeout_s: float = 60.0) -> int:
    """The pid of the backend of this database that waits for a lock (polls until one does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid: int | None = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        if pid is not None:
            return pid
        if time.monotonic() > deadline:
            raise AssertionError("no pass waits for the held window")
        await asyncio.sleep(0.05)


async def advisory_locks(conn: asyncpg.Connection, pid: int) -> int:
    held: int = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND granted", pid
    )
    return held


async def test_a_tick_committed_during_a_pass_is_not_lost(
    rollup_url: str, db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    await write(ticks, "1-0", tick("AAPL", 100, "10"))
    async with held_window(rollup_url, "AAPL", at(0), at(1000)):
        running = asyncio.create_task(rollups.merge_pass(1000, WIDTHS))
        await waiting_backend(db)  # the pass claimed the mark and is recomputing
        await write(ticks, "2-0", tick("AAPL", 200, "20"))  # committed mid-pass, same second
    result = await running
    assert result.marks == 1
    # The recompute's snapshot predates the new tick, so the pass wrote close 10;
    # the new tick's own mark, which it never claimed, is still queued.
    assert (await stored(db))[("AAPL", at(0), at(1000))][3] == 10
    assert await marks(db) == [("AAPL", at(0))]
    await drain(rollups)
    assert await marks(db) == []
    assert (await stored(db))[("AAPL", at(0), at(1000))][3] == 20
    assert await stored(db) == await expected(db)


async def test_a_pass_holds_at_most_max_symbols_advisory_locks(
    rollup_url: str, db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    cap = Settings.from_env({}).rollup_max_symbols_per_pass
    symbols = cap * 3
    await write(ticks, "1-0", tick("S000", 0, "1"))  # the oldest mark: the pass takes S000
    await write(ticks, "2-0", *(tick(f"S{i:03d}", i, f"{i}.5") for i in range(1, symbols)))
    async with held_window(rollup_url, "S000", at(0), at(1000)):
        running = asyncio.create_task(rollups.merge_pass(1000, WIDTHS))
        held = await advisory_locks(db, await waiting_backend(db))
    result = await running
    assert held == cap
    assert (result.symbols, result.marks, result.busy) == (cap, cap, 0)
    assert len(await marks(db)) == symbols - cap
    passes = 1
    while (await rollups.merge_pass(1000, WIDTHS)).marks:
        passes += 1
    assert passes == 3
    assert await stored(db) == await expected(db)


async def test_a_worker_rolls_up_other_symbols_while_one_is_held(
    rollup_url: str, db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    """Worker A is mid-pass on AAPL; worker B, with marks of AAPL and MSFT queued, rolls
    up MSFT and leaves AAPL's marks for later, instead of waiting for A to commit."""
    other = await RollupStore.open(rollup_url)
    try:
        await write(ticks, "1-0", tick("AAPL", 100, "10"))
        async with held_window(rollup_url, "AAPL", at(0), at(1000)):
            running_a = asyncio.create_task(rollups.merge_pass(1000, WIDTHS))
            worker_a = await waiting_backend(db)
            assert await advisory_locks(db, worker_a) == 1
            # Queued after A's claim: a new AAPL second and a MSFT one.
            await write(ticks, "2-0", tick("AAPL", 1500, "11"), tick("MSFT", 100, "20"))
            result_b = await other.merge_pass(1000, WIDTHS)
            assert (result_b.symbols, result_b.marks, result_b.busy) == (1, 1, 1)
            assert {key[0] for key in await stored(db)} == {"MSFT"}
            assert await marks(db) == [("AAPL", at(0)), ("AAPL", at(1000))]
        result_a = await running_a
        assert (result_a.symbols, result_a.marks) == (1, 1)
        await drain(rollups)
        assert await marks(db) == []
        assert await stored(db) == await expected(db)
    finally:
        await other.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- covering: which aggregates hold time T ----------------------------------------------


async def test_covering_returns_one_window_per_width_narrowest_first(
    db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    await write(ticks, "1-0", tick("AAPL", 1100, "10.50"), tick("AAPL", 1900, "10.25", "3"))
    await write(ticks, "2-0", tick("AAPL", 5000, "11"), tick("MSFT", 1500, "400"))
    await drain(rollups)

    found = await covering(db, "AAPL", at(1500))
    assert [(r.width_s, r.start, r.end) for r in found] == [
        (1, at(1000), at(2000)),
        (60, at(0), at(60_000)),
    ]
    assert (found[0].open, found[0].close, found[0].volume, found[0].count) == (
        Decimal("10.50"),
        Decimal("10.25"),
        Decimal(4),
        2,
    )
    assert found[0].to_json() == {
        "width": "1s",
        "start": "2023-11-14T22:14:01.000000Z",
        "end": "2023-11-14T22:14:02.000000Z",
        "open": "10.50",
        "high": "10.50",
        "low": "10.25",
        "close": "10.25",
        "volume": "4",
        "count": 2,
    }
    # A window is [start, end): its end belongs to the next one.
    assert [r.width_s for r in await covering(db, "AAPL", at(2000))] == [60]
    assert await covering(db, "AAPL", at(120_000)) == []
    assert await covering(db, "NOPE", at(1500)) == []


async def test_uint256_quantities_roll_up_exactly(
    db: asyncpg.Connection, ticks: TickStore, rollups: RollupStore
) -> None:
    """78-digit prices and volumes (wei) stay exact; their sum may outgrow 78 digits."""
    uint256_max = 2**256 - 1
    price = "9" * 78 + "." + "9" * 18
    await write(
        ticks,
        "1-0",
        tick("WEI", 100, "1" + "0" * 77, str(uint256_max)),
        tick("WEI", 200, price, str(uint256_max)),
        tick("WEI", 300, "2" + "0" * 77 + ".000000000000000001", "0.000000000000000001"),
    )
    await drain(rollups)
    assert await stored(db) == await expected(db)
    [second, _minute] = await covering(db, "WEI", at(150))
    assert second.to_json() == {
        "width": "1s",
        "start": "2023-11-14T22:14:00.000000Z",
        "end": "2023-11-14T22:14:01.000000Z",
        "open": "1" + "0" * 77,
        "high": price,
        "low": "1" + "0" * 77,
        "close": "2" + "0" * 77 + ".000000000000000001",
        "volume": f"{2 * uint256_max}.000000000000000001",  # 79 integer digits
        "count": 3,
    }


async def test_the_covering_query_uses_the_gist_index(db: asyncpg.Connection) -> None:
    # 40 symbols x 3,600 one-second windows + their minutes: ~150,000 rows.
    await db.execute(
        """INSERT INTO md_ranges (symbol, "window", agg)
           SELECT 'S' || s, tstzrange(t, t + w * interval '1 second', '[)'), '{}'
           FROM generate_series(1, 40) AS s,
                unnest(ARRAY[1, 60]) AS w,
                generate_series(timestamptz '2024-01-01', timestamptz '2024-01-01 00:59:59',
                                w * interval '1 second') AS t"""
    )
    await db.execute("ANALYZE md_ranges")
    plan = "\n".join(
        r[0]
        for r in await db.fetch(
            "EXPLAIN SELECT * FROM md_ranges"
            " WHERE symbol = 'S7' AND \"window\" @> timestamptz '2024-01-01 00:30:00.5+00'"
        )
    )
    assert "md_ranges_symbol_window_gist" in plan, plan


# -- the worker as a process ---------------------------------------------------------------


def rollup_env(url: str, **extra: str) -> dict[str, str]:
    import os

    return {**os.environ, "DATABASE_URL": url, "ROLLUP_POLL_S": "0.05", **extra}


def start_worker(env: dict[str, str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tickpipe", "rollup"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def tickpipe_rollup(
    env: dict[str, str], *args: str, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickpipe", "rollup", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


async def test_burst_drains_the_queue_and_exits(
    rollup_url: str, db: asyncpg.Connection, ticks: TickStore
) -> None:
    for batch in range(30):
        await write(
            ticks,
            f"{batch + 1}-0",
            *(tick(f"S{i % 4}", batch * 700 + i * 37, f"{100 + i}.{batch:02d}") for i in range(20)),
        )
    assert len(await marks(db)) > 30
    done = await asyncio.to_thread(
        tickpipe_rollup,
        rollup_env(rollup_url, ROLLUP_BATCH_SIZE="7", ROLLUP_MAX_SYMBOLS_PER_PASS="2"),
        "--burst",
    )
    assert done.returncode == 0, done.stderr
    assert "burst: queue drained" in done.stderr
    assert await marks(db) == []
    assert await stored(db) == await expected(db)


async def test_backfill_rolls_up_ticks_written_before_rollups(stack: LocalStack) -> None:
    url = database_url(stack, "tickpipe_backfill")
    await ensure_database(url)
    await apply_schema(url)
    conn = await asyncpg.connect(url)
    try:
        store = await TickStore.open(url, max_size=1)
        await write(store, "1-0", *(tick(f"S{i % 3}", i * 450, f"{i + 1}.5") for i in range(300)))
        await store.close()
        await apply_schema(url, rollups=True)
        assert await marks(conn) == []  # the trigger came after the ticks

        # Only the first minute: the rest stays unrolled.
        part = await asyncio.to_thread(
            tickpipe_rollup,
            rollup_env(url),
            "--backfill",
            "--burst",
            "--until",
            str((T0 + 60_000_000) // 1000),
        )
        assert part.returncode == 0, part.stderr
        ranges = await stored(conn)
        everything = await expected(conn)
        assert ranges == {key: v for key, v in everything.items() if key[2] <= at(60_000)}

        full = await asyncio.to_thread(tickpipe_rollup, rollup_env(url), "--backfill", "--burst")
        assert full.returncode == 0, full.stderr
        assert "backfill: queued" in full.stderr
        assert await stored(conn) == everything
    finally:
        await conn.close()


def test_postgres_down_at_start_is_retried_with_a_clear_message(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/tickpipe"
    log = tmp_path / "rollup.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tickpipe", "rollup"],
            env=rollup_env(url),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("retrying in") < 2:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "cannot roll up queued marks: postgres:" in text
    assert "stopped while Postgres was unavailable" in text
    assert "Traceback" not in text


async def test_a_database_without_the_rollup_schema_is_a_clear_error(stack: LocalStack) -> None:
    done = await asyncio.to_thread(tickpipe_rollup, rollup_env(stack.database_url), "--burst")
    assert done.returncode == 1
    assert "run `tickpipe schema apply --rollups`" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_widths_are_a_settings_error() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["rollup", "--burst"], env={"ROLLUP_WIDTHS": "1s,5x"})
    assert result.exit_code == 1
    assert "configuration: ROLLUP_WIDTHS: '5x' is not a window width" in result.output
    flag = runner.invoke(main, ["rollup", "--widths", "1m,60s"])
    assert flag.exit_code == 2
    assert "'60s' is the same width as '1m'" in flag.output


def test_since_must_be_a_tick_ts() -> None:
    result = CliRunner().invoke(main, ["rollup", "--backfill", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since" in result.output
    assert "RFC 3339" in result.output
    alone = CliRunner().invoke(main, ["rollup", "--until", "0"])
    assert alone.exit_code == 2
    assert "--since and --until go with --backfill" in alone.output


# -- the required one: competing workers while ticks keep coming ---------------------------


async def test_competing_workers_converge_on_exact_aggregates(
    rollup_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two worker processes, two writers committing late ticks, replacements and stale
    versions all along; once the queue is empty, every window of every width equals
    the aggregate computed straight from md_ticks."""
    widths = (1, 5, 60)
    # At most 2 of the 4 symbols per pass: the workers also race for symbol locks.
    env = rollup_env(
        rollup_url,
        ROLLUP_WIDTHS="1s,5s,1m",
        ROLLUP_BATCH_SIZE="40",
        ROLLUP_MAX_SYMBOLS_PER_PASS="2",
    )
    logs = [tmp_path / f"worker-{n}.log" for n in (1, 2)]
    files = [path.open("wb") for path in logs]
    workers = [start_worker(env, file) for file in files]
    rng = random.Random(2026)
    stream_ids = itertools.count(1)
    written: list[tuple[str, int]] = []

    async def writer() -> None:
        store = await TickStore.open(rollup_url, max_size=1)
        try:
            for _ in range(200):
                rows = []
                for _ in range(rng.randint(5, 40)):
                    if written and rng.random() < 0.2:
                        symbol, offset_ms = rng.choice(written)  # a replacement
                    else:
                        # Anywhere in two minutes: most land in windows already rolled up.
                        symbol, offset_ms = f"S{rng.randrange(4)}", rng.randrange(120_000)
                        written.append((symbol, offset_ms))
                    price = Decimal(rng.randint(1, 10**7)).scaleb(-rng.randint(0, 6))
                    volume = Decimal(rng.randint(0, 10**4)).scaleb(-rng.randint(0, 3))
                    tick_ = Tick(symbol, T0 + offset_ms * 1000, price, volume, "race")
                    # One in ten batches is an old version arriving late: it must change nothing.
                    rows.append(tick_)
                stream_id = (
                    f"0-{next(stream_ids)}" if rng.random() < 0.1 else f"{next(stream_ids)}-0"
                )
                await store.upsert(last_per_key(Row(stream_id, t) for t in rows))
                await asyncio.sleep(0.005)
        finally:
            await store.close()

    async def started() -> bool:
        return all("rollup worker: widths" in path.read_text() for path in logs)

    async def queue_empty() -> bool:
        return await db.fetchval("SELECT count(*) FROM md_ranges_dirty") == 0

    try:
        await eventually(started)
        await asyncio.gather(writer(), writer())
        await eventually(queue_empty, timeout_s=180)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(worker.wait, 60) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for file in files:
            file.close()
    texts = [path.read_text() for path in logs]
    assert codes == [0, 0], texts
    passes = [int(m.group(1)) for t in texts for m in re.finditer(r"stopped: (\d+) passes", t)]
    assert len(passes) == 2
    assert min(passes) > 0, texts  # both workers took part

    ranges = await stored(db)
    assert len(ranges) > 400
    assert ranges == await expected(db, widths)
