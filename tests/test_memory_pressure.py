"""A Redis with a small maxmemory under sustained load: acknowledged history never fills it.

A Redis of its own (maxmemory 64 MB, noeviction: a full Redis refuses writes),
a flusher process with the default retention (STREAM_RETENTION_S an hour,
STREAM_RETENTION_MAX_ENTRIES 2,000,000: far more than 64 MB holds) and ingest's
writer appending about twice maxmemory's worth of ticks, slowed only when the
backlog (lag + pending) passes a bound, as ingest's 429 does. Only memory
pressure keeps acknowledged history in check: no write may be refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ingest.writer import TickWriter
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

MAXMEMORY = 64 * 2**20
TICKS = 450_000
BATCH = 2000
MAX_BACKLOG = 60_000
"""Entries delivered or waiting: about 11 MB of unacknowledged entries at most."""
SOURCE = "feed-" + "x" * 59
"""64 characters: with 60- to 76-digit decimals and 32-character symbols, ~250 B an entry."""


def big_tick(i: int) -> Tick:
    return Tick(
        symbol=f"S{i % 16:02d}".ljust(32, "_"),
        ts_us=1_700_000_000_000_000 + i,
        price=Decimal(f"{10**57 + i}.{i:018d}"),
        volume=Decimal(f"{10**40 + i}.{i % 997:018d}"),
        source=SOURCE,
    )


def _quiet(message: str) -> None:
    pass


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[LocalStack]:
    """A Redis of its own that refuses writes past 64 MB (Postgres stays the session's)."""
    local = LocalStack(tmp_path / "small", free_port(), free_port(), log=_quiet)
    local.start_redis()
    try:
        yield local
    finally:
        local.stop_redis()


def start_flusher(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tickpipe", "flusher", "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    return process.wait(timeout=30)


async def backlog_below(redis: Redis, limit: int) -> None:
    for _ in range(6000):
        if await backlog(redis) <= limit:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the backlog stayed over {limit} entries for two minutes")


async def backlog(redis: Redis) -> int:
    groups = await redis.xinfo_groups("ticks.received")
    return sum(int(g["lag"] or 0) + int(g["pending"]) for g in groups)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def test_acknowledged_history_never_fills_a_small_redis(
    small_redis: LocalStack, settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    redis = Redis.from_url(small_redis.redis_url)
    await redis.config_set("maxmemory", str(MAXMEMORY))
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.xgroup_create("ticks.received", "flushers", id="0", mkstream=True)
    metrics_port = free_port()
    log_path = tmp_path / "flusher.log"
    env = {
        **os.environ,
        "REDIS_URL": small_redis.redis_url,
        "DATABASE_URL": settings.database_url,
        "FLUSHER_CONSUMER": "pressed",
        "FLUSH_BATCH_SIZE": "2000",
        "FLUSH_INTERVAL_S": "0.1",
        "FLUSHER_METRICS_PORT": str(metrics_port),
    }
    flusher = start_flusher(env, log_path)
    refused: list[str] = []
    peak = 0
    started = time.monotonic()
    try:
        writer = TickWriter(redis, "ticks.received", "ticks:latest")

        async def append(first: int, step: int) -> None:
            nonlocal peak
            for start in range(first, TICKS, step):
                await backlog_below(redis, MAX_BACKLOG)  # ingest would answer 429 meanwhile
                try:
                    await writer.append([big_tick(i) for i in range(start, start + BATCH)])
                except ResponseError as exc:
                    refused.append(str(exc))
                    if len(refused) > 5:
                        return
                peak = max(peak, int((await redis.info("memory"))["used_memory"]))

        # Two writers: one encodes its next batch while Redis runs the other's.
        await asyncio.gather(append(0, 2 * BATCH), append(BATCH, 2 * BATCH))
        written_s = time.monotonic() - started
        assert refused == [], refused[:3]
        deadline = time.monotonic() + 60
        while await backlog(redis) and time.monotonic() < deadline:
            assert flusher.poll() is None, log_path.read_text()[-3000:]
            await asyncio.sleep(0.1)
        assert await backlog(redis) == 0
        drained_s = time.monotonic() - started

        assert await pg.fetchval("SELECT count(*) FROM md_ticks") == TICKS
        with localcontext() as exact:
            exact.prec = 80
            expected = sum(big_tick(i).volume for i in range(TICKS))
        assert await pg.fetchval("SELECT sum(volume) FROM md_ticks") == expected
        assert await pg.fetchval("SELECT count(*) FROM md_ticks WHERE source = $1", SOURCE) == TICKS
        assert peak < MAXMEMORY
        per_entry = await redis.memory_usage("ticks.received", samples=0) / max(
            1, await redis.xlen("ticks.received")
        )
        assert TICKS * per_entry > 1.5 * MAXMEMORY  # well over maxmemory was written
        trimmed = metric(metrics_port, "tickpipe_flusher_trimmed_under_pressure_total")
        assert trimmed > 0
        assert metric(metrics_port, "tickpipe_flusher_memory_pressure") == 1
    finally:
        code = await asyncio.to_thread(stop, flusher)
        await redis.aclose()
    log_text = log_path.read_text()
    assert code == 0, log_text[-3000:]
    # One episode, one warning: not one per check.
    assert log_text.count("Redis memory pressure: ") == 1, log_text[-3000:]

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tickpipe", "audit", "--json"],
        env={**env, "FLUSHER_METRICS_PORT": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    stream = report["stream"]
    assert 0 < stream["length"] < TICKS
    assert stream["first_id"] is not None
    assert stream["first_age_ms"] < (time.monotonic() - started) * 1000 + 1000
    assert 0 < stream["memory_bytes"] < MAXMEMORY
    print(
        f"\n{TICKS} ticks of ~{per_entry:.0f} B ({TICKS * per_entry / 2**20:.0f} MiB) into a"
        f" {MAXMEMORY / 2**20:.0f} MiB Redis: written in {written_s:.1f} s, drained in"
        f" {drained_s:.1f} s, peak used_memory {peak / 2**20:.1f} MiB, {trimmed:.0f} entries"
        f" trimmed under pressure; retained {stream['length']} entries,"
        f" {stream['memory_bytes'] / 2**20:.1f} MiB"
    )
