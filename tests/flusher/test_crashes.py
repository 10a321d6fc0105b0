"""Flushers as real processes: competition, kill -9 at exact points, outages, SIGTERM, DLQ.

Crash points are exact: TICKPIPE_FAULT makes a flusher SIGKILL itself (or
pause) at a named point of a batch, instead of relying on timing luck.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from ingest.writer import TickWriter
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

STREAM, GROUP = "ticks.received", "flushers"


class Flushers:
    """Starts flusher processes with their stderr in files, and cleans up."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[object] = []

    def start(self, consumer: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{consumer}-{len(self.procs)}.log").open("wb")
        self._files.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tickpipe", "flusher", "run", "--consumer", consumer, *args],
            env={**self.env, **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self._files:
            log.close()  # type: ignore[attr-defined]


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


@pytest.fixture
def flushers(
    subprocess_env: dict[str, str], tmp_path: Path, redis: Redis, pg: asyncpg.Connection
) -> Iterator[Flushers]:
    env = {
        **subprocess_env,
        "FLUSH_BATCH_SIZE": "50",
        "FLUSH_INTERVAL_S": "0.05",
        "FLUSH_CLAIM_IDLE_S": "60",
        "FLUSH_CLAIM_INTERVAL_S": "0.2",
        "FLUSH_UPKEEP_INTERVAL_S": "0.5",
    }
    started = Flushers(env, tmp_path)
    yield started
    started.stop_all()


def make_ticks(count: int, *, symbols: int = 7, start: int = 1_700_000_000_000_000) -> list[Tick]:
    return [
        Tick(
            f"S{i % symbols}",
            start + i,
            Decimal(f"{i + 1}.{i % 97:02d}"),
            Decimal(i % 500),
            "crash",
        )
        for i in range(count)
    ]


async def append(redis: Redis, settings: Settings, ticks: list[Tick]) -> None:
    writer = TickWriter(redis, settings.stream_name, settings.latest_key)
    for start in range(0, len(ticks), 100):
        await writer.append(ticks[start : start + 100])


async def rows(pg: asyncpg.Connection) -> dict[tuple[str, int], tuple[Decimal, Decimal, str]]:
    from tickpipe.core.ticks import datetime_to_us

    records = await pg.fetch("SELECT symbol, ts, price, volume, source FROM md_ticks")
    return {
        (r["symbol"], datetime_to_us(r["ts"])): (r["price"], r["volume"], r["source"])
        for r in records
    }


def expected(ticks: list[Tick]) -> dict[tuple[str, int], tuple[Decimal, Decimal, str]]:
    return {t.key: (t.price, t.volume, t.source) for t in ticks}


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def pending(redis: Redis) -> int:
    summary = await redis.xpending(STREAM, GROUP)
    return int(summary["pending"])


async def acked(redis: Redis) -> int:
    [group] = await redis.xinfo_groups(STREAM)
    return int(group["entries-read"]) - int(group["pending"])


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    return await asyncio.to_thread(proc.wait, timeout_s)


def stopped_line(proc: subprocess.Popen[bytes]) -> dict[str, int]:
    match = re.search(
        r"stopped: (\d+) rows written, (\d+) entries acknowledged, (\d+) reclaimed,"
        r" (\d+) dead-lettered, (\d+) lost",
        stderr_of(proc),
    )
    assert match, stderr_of(proc)
    keys = ("rows", "acked", "reclaimed", "dead", "lost")
    return dict(zip(keys, map(int, match.groups()), strict=True))


# -- competition --------------------------------------------------------------------------


async def test_two_flushers_share_the_work_exactly_once(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    a, b = flushers.start("compete-a"), flushers.start("compete-b")
    sent = make_ticks(3000)
    await append(redis, settings, sent)

    async def drained() -> bool:
        return len(await rows(pg)) == 3000 and await pending(redis) == 0

    await eventually(drained)
    for proc in (a, b):
        proc.send_signal(signal.SIGTERM)
    assert await wait_exit(a) == 0
    assert await wait_exit(b) == 0
    assert await rows(pg) == expected(sent)
    share_a, share_b = stopped_line(a), stopped_line(b)
    assert share_a["acked"] > 0
    assert share_b["acked"] > 0
    assert share_a["acked"] + share_b["acked"] == 3000
    assert await pg.fetchval("SELECT count(*) FROM md_ticks") == 3000


# -- kill -9 at exact points ---------------------------------------------------------------


async def test_kill_after_commit_before_ack_is_replayed_harmlessly(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    sent = make_ticks(200)
    await append(redis, settings, sent)
    victim = flushers.start("victim", TICKPIPE_FAULT="after_commit")
    assert await wait_exit(victim) == -signal.SIGKILL
    first = await pg.fetch("SELECT symbol, ts, price, xmin::text AS version FROM md_ticks")
    assert len(first) == 50  # the batch was committed ...
    # ... and not acknowledged; with it, the next batch, read while the first committed.
    held = await pending(redis)
    assert held in (50, 100)

    rescuer = flushers.start("rescuer", FLUSH_CLAIM_IDLE_S="0.3")

    async def drained() -> bool:
        return len(await rows(pg)) == 200 and await pending(redis) == 0

    await eventually(drained)
    assert await rows(pg) == expected(sent)
    after = {
        (r["symbol"], r["ts"]): r["version"]
        for r in await pg.fetch("SELECT symbol, ts, xmin::text AS version FROM md_ticks")
    }
    # The replayed batch changed nothing: same row versions, no duplicates.
    assert all(after[(r["symbol"], r["ts"])] == r["version"] for r in first)
    rescuer.send_signal(signal.SIGTERM)
    assert await wait_exit(rescuer) == 0
    assert stopped_line(rescuer)["reclaimed"] == held


async def test_kill_before_commit_loses_nothing(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    sent = make_ticks(200)
    await append(redis, settings, sent)
    victim = flushers.start("victim", TICKPIPE_FAULT="before_commit")
    assert await wait_exit(victim) == -signal.SIGKILL
    assert await rows(pg) == {}
    assert await pending(redis) in (50, 100)  # the batch, and the next one if read already

    rescuer = flushers.start("rescuer", FLUSH_CLAIM_IDLE_S="0.3")

    async def drained() -> bool:
        return len(await rows(pg)) == 200 and await pending(redis) == 0

    await eventually(drained)
    assert await rows(pg) == expected(sent)
    rescuer.send_signal(signal.SIGTERM)
    assert await wait_exit(rescuer) == 0


async def test_restart_under_the_same_name_drains_its_own_pending_first(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    sent = make_ticks(120)
    await append(redis, settings, sent)
    victim = flushers.start("steady", TICKPIPE_FAULT="before_commit")
    assert await wait_exit(victim) == -signal.SIGKILL
    assert await pending(redis) in (50, 100)  # the batch, and the next one if read already

    again = flushers.start("steady", "--burst")  # claim idle is 60 s: no reclaim here
    assert await wait_exit(again) == 0
    assert "re-processing 50 pending entries of steady" in stderr_of(again)
    assert await rows(pg) == expected(sent)
    assert await pending(redis) == 0


# -- poison entries --------------------------------------------------------------------------


async def test_poison_entries_go_to_the_dead_letter_stream(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    await pg.execute("ALTER TABLE md_ticks ADD CONSTRAINT test_price_cap CHECK (price < 100000)")
    try:
        good = make_ticks(120)
        bad = Tick("S1", 1_800_000_000_000_000, Decimal("250000.5"), Decimal(1), "too-high")
        await append(redis, settings, good[:60])
        await append(redis, settings, [bad])
        garbage_id = (
            await redis.xadd(STREAM, {"symbol": "S2", "ts": "not-a-number", "price": "1"})
        ).decode()
        await append(redis, settings, good[60:])
        proc = flushers.start(
            "poisoned",
            FLUSH_MAX_DELIVERIES="2",
            FLUSH_CLAIM_IDLE_S="0.2",
            FLUSH_CLAIM_INTERVAL_S="0.1",
        )

        async def settled() -> bool:
            return await redis.xlen("ticks.dead") == 2 and await pending(redis) == 0

        await eventually(settled)
        assert await rows(pg) == expected(good)
        letters = {
            fields[b"original_id"].decode(): fields
            for _, fields in await redis.xrange("ticks.dead")
        }
        garbage = letters.pop(garbage_id)
        assert garbage[b"reason"].startswith(b"undecodable")
        assert garbage[b"deliveries"] == b"1"  # a decode error is permanent: no retry
        assert garbage[b"field:ts"] == b"not-a-number"
        [(too_high_id, too_high)] = letters.items()
        assert b"CheckViolation" in too_high[b"reason"]
        assert too_high[b"field:price"] == b"250000.5"
        assert too_high[b"deliveries"] == b"2"
        assert too_high[b"stream"] == STREAM.encode()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
        assert stopped_line(proc)["dead"] == 2
        del too_high_id
    finally:
        await pg.execute("ALTER TABLE md_ticks DROP CONSTRAINT test_price_cap")


async def test_burst_exits_1_naming_the_entries_it_dead_lettered(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    good = make_ticks(120)
    await append(redis, settings, good[:60])
    await redis.xadd(STREAM, {"symbol": "x"})  # not written by ingest: fields missing
    await redis.xadd(
        STREAM, {"symbol": "S1", "ts": "1", "price": b"\xff", "volume": "1", "source": "s"}
    )
    await append(redis, settings, good[60:])
    proc = flushers.start("burst", "--burst")  # FLUSH_MAX_DELIVERIES 5, claim idle 60 s
    assert await wait_exit(proc) == 1
    log = stderr_of(proc)
    assert "burst: 2 entries dead-lettered to ticks.dead; see `tickpipe dlq list`" in log
    assert "stream drained" not in log
    assert "Traceback" not in log
    assert await rows(pg) == expected(good)  # the good rows, in the same run
    assert await pending(redis) == 0
    assert await redis.xlen("ticks.dead") == 2
    assert stopped_line(proc)["dead"] == 2

    await append(redis, settings, make_ticks(10, start=1_800_000_000_000_000))
    clean = flushers.start("burst", "--burst")
    assert await wait_exit(clean) == 0
    assert "burst: stream drained; nothing dead-lettered, nothing left pending" in stderr_of(clean)


async def test_burst_exits_1_naming_the_entries_it_left_pending(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    await pg.execute("ALTER TABLE md_ticks ADD CONSTRAINT test_price_cap CHECK (price < 100000)")
    try:
        good = make_ticks(50)
        bad = Tick("S1", 1_800_000_000_000_000, Decimal("250000.5"), Decimal(1), "too-high")
        await append(redis, settings, [*good[:25], bad, *good[25:]])
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "flusher", "--consumer", "keeper", "--burst"],
            env=flushers.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        await pg.execute("ALTER TABLE md_ticks DROP CONSTRAINT test_price_cap")
    assert result.returncode == 1, result.stderr
    assert "burst: 1 entry left pending by keeper, not in Postgres yet" in result.stderr
    assert "dead-lettered to" not in result.stderr
    assert await rows(pg) == expected(good)
    assert await pending(redis) == 1  # a rejected row keeps its FLUSH_MAX_DELIVERIES retries
    assert await redis.xlen("ticks.dead") == 0

    again = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "flusher", "--consumer", "keeper", "--burst"],
        env=flushers.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr  # the constraint is fixed: written at last
    assert await rows(pg) == expected([*good, bad])
    assert await pending(redis) == 0


# -- outages -------------------------------------------------------------------------------


async def test_postgres_outage_acks_nothing_then_catches_up(
    flushers: Flushers,
    redis: Redis,
    pg: asyncpg.Connection,
    settings: Settings,
    stack: LocalStack,
) -> None:
    proc = flushers.start("patient")
    first, second = make_ticks(100), make_ticks(150, start=1_710_000_000_000_000)
    await append(redis, settings, first)
    await eventually(lambda: _count_is(pg, 100))
    await pg.close()
    stack.stop_postgres()
    try:
        await append(redis, settings, second)
        await asyncio.sleep(3)
        assert proc.poll() is None  # waiting, not crashed
        assert await acked(redis) == 100  # nothing acknowledged while Postgres is down
    finally:
        stack.start_postgres()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await eventually(lambda: _count_is(conn, 250))
        assert await rows(conn) == expected(first + second)
    finally:
        await conn.close()
    await eventually(lambda: _pending_is(redis, 0))
    log = stderr_of(proc)
    assert "cannot write the batch to Postgres" in log
    assert "retrying in" in log
    assert "recovered" in log
    # Backoff, not a busy loop: a handful of retries in three seconds, not thousands.
    assert log.count("cannot write the batch to Postgres") < 40
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc) == 0


async def test_redis_outage_is_waited_out(
    flushers: Flushers,
    redis: Redis,
    pg: asyncpg.Connection,
    settings: Settings,
    stack: LocalStack,
) -> None:
    proc = flushers.start("patient")
    first, second = make_ticks(60), make_ticks(80, start=1_720_000_000_000_000)
    await append(redis, settings, first)
    await eventually(lambda: _count_is(pg, 60))
    stack.stop_redis()
    try:
        await asyncio.sleep(2)
        assert proc.poll() is None
    finally:
        stack.start_redis()
    await redis.connection_pool.disconnect()
    await append(redis, settings, second)
    await eventually(lambda: _count_is(pg, 140))
    assert await rows(pg) == expected(first + second)
    assert "retrying in" in stderr_of(proc)
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc) == 0


async def _count_is(conn: asyncpg.Connection, count: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM md_ticks") == count


async def _pending_is(redis: Redis, count: int) -> bool:
    return await pending(redis) == count


# -- shutdown ------------------------------------------------------------------------------


async def test_sigterm_mid_batch_commits_and_acks_it(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    sent = make_ticks(50)
    await append(redis, settings, sent)
    proc = flushers.start("graceful", TICKPIPE_FAULT="before_commit:sleep=2")

    async def paused() -> bool:
        return "fault injection: sleeping" in stderr_of(proc)

    await eventually(paused)
    proc.send_signal(signal.SIGTERM)  # the batch is read, not yet committed
    assert await wait_exit(proc, 20) == 0
    assert await rows(pg) == expected(sent)
    assert await pending(redis) == 0


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_endpoint(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    port = free_port()
    proc = flushers.start("measured", "--metrics-port", str(port))
    await append(redis, settings, make_ticks(120))
    await eventually(lambda: _count_is(pg, 120))
    await asyncio.sleep(0.7)  # one upkeep round publishes pending and lag
    values = await flusher_metrics(port)
    assert values["tickpipe_flusher_rows_total"] == 120
    assert values["tickpipe_flusher_batches_total"] >= 3
    # One commit-lag observation per batch (its oldest entry).
    assert (
        values["tickpipe_flusher_commit_lag_seconds_count"]
        == values["tickpipe_flusher_batches_total"]
    )
    assert values["tickpipe_flusher_flush_seconds_count"] >= 3
    assert values["tickpipe_flusher_pending"] == 0
    assert values["tickpipe_flusher_lag"] == 0
    for name in ("reclaimed", "dead_lettered", "lost"):
        assert values[f"tickpipe_flusher_{name}_total"] == 0
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc) == 0


# -- stream order across batches -------------------------------------------------------


async def test_an_older_version_replayed_late_does_not_win(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    original = Tick("K", 1_750_000_000_000_000, Decimal("1"), Decimal(1), "original")
    correction = Tick("K", 1_750_000_000_000_000, Decimal("2"), Decimal(1), "correction")
    await append(redis, settings, [original])
    # Its heartbeat outlives it for two minutes: nobody takes its entry until it expires.
    victim = flushers.start("victim", TICKPIPE_FAULT="after_commit", FLUSH_DEAD_AFTER_S="120")
    assert await wait_exit(victim) == -signal.SIGKILL  # original committed, not acked
    await append(redis, settings, [correction])
    other = flushers.start("other", "--burst")  # no reclaim: writes the correction
    assert await wait_exit(other) == 0
    assert stopped_line(other)["reclaimed"] == 0
    await redis.delete(settings.shard_map.shards[0].heartbeat(GROUP, "victim"))  # expired
    rescuer = flushers.start("rescuer", "--burst")
    assert await wait_exit(rescuer) == 0  # replays the original, older entry
    assert stopped_line(rescuer)["reclaimed"] == 1
    assert await rows(pg) == expected([correction])
    assert await pending(redis) == 0


async def test_shutdown_is_bounded_when_a_statement_hangs(
    flushers: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    sent = make_ticks(10)
    await append(redis, settings, sent[:5])
    first = flushers.start("first", "--burst")
    assert await wait_exit(first) == 0
    blocker = await asyncpg.connect(settings.database_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT * FROM md_ticks FOR UPDATE")  # the flusher will wait
        await append(redis, settings, sent)
        proc = flushers.start("stuck", FLUSH_SHUTDOWN_GRACE_S="1")
        await asyncio.sleep(1.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 30) == 1
        assert time.monotonic() - started < 20  # grace 1 s + watchdog 2 s + closing
        assert "entries stay pending" in stderr_of(proc)
        await lock.rollback()
    finally:
        await blocker.close()
    assert await pending(redis) == 10  # nothing acknowledged
    again = flushers.start("stuck", "--burst")
    assert await wait_exit(again) == 0
    assert await rows(pg) == expected(sent)


async def flusher_metrics(port: int) -> dict[str, float]:
    """The flusher's samples (``tickpipe_flusher_*``) from its ``/metrics`` on ``port``."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("tickpipe_flusher") and " " in line
    }
