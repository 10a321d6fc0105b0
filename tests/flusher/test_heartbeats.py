"""Heartbeats, with real processes: a dead flusher's entries are taken over in seconds,
a live one's never, and a flusher frozen past its heartbeat writes nothing wrong.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from ingest.app import create_app
from tests.conftest import TEST_TOKEN
from tests.flusher.test_crashes import (
    GROUP,
    STREAM,
    Flushers,
    append,
    eventually,
    expected,
    flusher_metrics,
    make_ticks,
    pending,
    rows,
    stderr_of,
    stopped_line,
    wait_exit,
)
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick
from tickpipe.lab.stack import free_port

pytestmark = pytest.mark.services


@pytest.fixture
def defaults(
    subprocess_env: dict[str, str], tmp_path: Path, redis: Redis, pg: asyncpg.Connection
) -> Iterator[Flushers]:
    """Flushers with every FLUSH_* setting at its default."""
    env = {key: value for key, value in subprocess_env.items() if not key.startswith("FLUSH_")}
    started = Flushers(env, tmp_path)
    yield started
    started.stop_all()


async def held_by(redis: Redis, consumer: str) -> int:
    summary = await redis.xpending(STREAM, GROUP)
    for holder in summary["consumers"] or []:
        if holder["name"].decode() == consumer:
            return int(holder["pending"])
    return 0


async def committed(pg: asyncpg.Connection, keys: list[tuple[str, int]]) -> int:
    """How many of these keys have their row in md_ticks."""
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM md_ticks t JOIN unnest($1::text[], $2::bigint[]) AS k(symbol, us)"
            " ON t.symbol = k.symbol"
            " AND t.ts = timestamptz 'epoch' + k.us * interval '1 microsecond'",
            [key[0] for key in keys],
            [key[1] for key in keys],
        )
    )


async def test_kill_9_under_load_is_recovered_by_the_peer_in_seconds(
    defaults: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    """Ingest and two flushers with the default settings; 8 connections POST single ticks."""
    victim, peer = defaults.start("load-a"), defaults.start("load-b")
    base_ms = 1_760_000_000_000
    total = 10_000
    accepted: dict[tuple[str, int], tuple[Decimal, Decimal, str]] = {}
    numbers = iter(range(total))

    async def post_ticks(session: aiohttp.ClientSession, url: str) -> None:
        for n in numbers:
            symbol, price, volume = f"HB{n % 16}", f"{n + 1}.{n % 89:02d}", str(n % 300)
            body = {
                "symbol": symbol,
                "ts": base_ms + n,
                "price": price,
                "volume": volume,
                "source": "heartbeat",
            }
            while True:
                async with session.post(url, json=body) as response:
                    if response.status == 200:
                        break
                    assert response.status in (429, 503), await response.text()
                await asyncio.sleep(0.05)
            accepted[(symbol, (base_ms + n) * 1000)] = (
                Decimal(price),
                Decimal(volume),
                "heartbeat",
            )

    server = TestServer(create_app(settings))
    await server.start_server()
    try:
        url = str(server.make_url("/ingest/tick"))
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {TEST_TOKEN}"},
            connector=aiohttp.TCPConnector(limit=8),
        ) as session:
            load = asyncio.gather(*(post_ticks(session, url) for _ in range(8)))
            await asyncio.sleep(2)
            held = await held_by(redis, "load-a")
            before_kill = list(accepted)
            killed_at = time.monotonic()
            victim.kill()
            await wait_exit(victim)

            async def taken_over() -> bool:
                return await held_by(redis, "load-a") == 0

            await eventually(taken_over, timeout_s=60)
            pending_zero_s = time.monotonic() - killed_at

            async def all_committed() -> bool:
                return await committed(pg, before_kill) == len(before_kill)

            await eventually(all_committed, timeout_s=60)
            recovered_s = time.monotonic() - killed_at
            print(
                f"kill -9 of a flusher holding {held} pending entries, {len(before_kill)} ticks"
                f" accepted before the kill: its pending was 0 after {pending_zero_s:.2f} s,"
                f" every tick accepted before the kill committed after {recovered_s:.2f} s"
            )
            await load
    finally:
        await server.close()

    async def drained() -> bool:
        return await pending(redis) == 0 and len(await rows(pg)) == total

    await eventually(drained, timeout_s=60)
    assert len(accepted) == total
    assert await rows(pg) == accepted
    peer.send_signal(signal.SIGTERM)
    assert await wait_exit(peer) == 0
    assert "its heartbeat expired" in stderr_of(peer)


async def test_a_live_flusher_stuck_in_a_commit_keeps_its_entries(
    defaults: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    sent = make_ticks(200)
    await append(redis, settings, sent)
    stuck = defaults.start(
        "stuck", FLUSH_BATCH_SIZE="1000", TICKPIPE_FAULT="before_commit:sleep=20"
    )

    async def sleeping() -> bool:
        return "fault injection: sleeping" in stderr_of(stuck)

    await eventually(sleeping)
    assert await held_by(redis, "stuck") == 200
    # Even the idle backstop, at 2 s, does not take a live flusher's entries.
    peer = defaults.start("peer", FLUSH_CLAIM_IDLE_S="2")
    heartbeat = settings.shard_map.shards[0].heartbeat(GROUP, "stuck")
    for _ in range(3):
        await asyncio.sleep(5)
        assert await held_by(redis, "stuck") == 200
        assert await redis.pttl(heartbeat) > 0  # refreshed while the commit waits

    async def written() -> bool:
        return await pending(redis) == 0 and len(await rows(pg)) == 200

    await eventually(written, timeout_s=30)
    assert await rows(pg) == expected(sent)
    for proc in (stuck, peer):
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    assert stopped_line(peer)["reclaimed"] == 0
    assert stopped_line(stuck)["acked"] == 200
    assert "0 lost, 0 committed late" in stderr_of(stuck)
    assert "acknowledged already" not in stderr_of(stuck)


async def test_a_flusher_frozen_past_its_heartbeat_then_resumed_writes_nothing_wrong(
    defaults: Flushers, redis: Redis, pg: asyncpg.Connection, settings: Settings
) -> None:
    first = make_ticks(200)
    await append(redis, settings, first)
    port = free_port()
    frozen = defaults.start(
        "frozen",
        "--metrics-port",
        str(port),
        FLUSH_BATCH_SIZE="1000",
        TICKPIPE_FAULT="before_commit:sleep=1",
    )

    async def about_to_commit() -> bool:
        return "fault injection: sleeping" in stderr_of(frozen)

    await eventually(about_to_commit)
    os.kill(frozen.pid, signal.SIGSTOP)  # its batch read, its COMMIT to come
    try:
        assert await held_by(redis, "frozen") == 200
        peer = defaults.start("peer")

        async def taken_over() -> bool:
            return await held_by(redis, "frozen") == 0 and await pending(redis) == 0

        await eventually(taken_over)
        assert await rows(pg) == expected(first)
        # Newer versions of some keys, written by the peer while the other is frozen.
        newer = [
            Tick(t.symbol, t.ts_us, t.price + Decimal("1000"), t.volume, "newer")
            for t in first[::3]
        ]
        await append(redis, settings, newer)
        latest = expected(first) | expected(newer)

        async def newer_written() -> bool:
            return await rows(pg) == latest and await pending(redis) == 0

        await eventually(newer_written)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)  # wakes up inside the batch and commits it

    async def late_commit_seen() -> bool:
        return "acknowledged already" in stderr_of(frozen)

    await eventually(late_commit_seen)
    # Each key once, with the value of its latest stream entry: the older batch
    # committed late changed nothing.
    assert await rows(pg) == latest
    assert await pg.fetchval("SELECT count(*) FROM md_ticks") == len(first)
    assert await pending(redis) == 0
    values = await flusher_metrics(port)
    assert values["tickpipe_flusher_late_commits_total"] == 1
    assert values["tickpipe_flusher_late_commit_entries_total"] == 200
    for proc in (frozen, peer):
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    assert stopped_line(peer)["reclaimed"] == 200
    assert "200 committed late" in stderr_of(frozen)
    assert "its heartbeat expired" in stderr_of(peer)
