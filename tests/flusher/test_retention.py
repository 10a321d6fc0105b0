"""Retention of acknowledged history: the age and entries bounds, memory pressure.

Against the session's real Redis: the trim is one Lua step (flusher/stream.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis, RedisCluster

from flusher.retention import PRESSURE_QUIET_S, Retention
from flusher.stream import TickStream
from tickpipe.core import redis_conn
from tickpipe.core.settings import Settings, SettingsError
from tickpipe.core.shards import ShardMap
from tickpipe.lab.cluster_stack import LocalCluster

STREAM = "ticks.received"
GROUP = "flushers"
NO_AGE_BOUND = "0-0"
"""A retention floor older than every entry: only the entries bound trims."""


def test_settings_read_the_bounds() -> None:
    env = {"REDIS_URL": "redis://x", "DATABASE_URL": "postgresql://x"}
    defaults = Settings.from_env(env)
    assert defaults.stream_retention_max_entries == 2_000_000
    assert defaults.stream_retention_pressure_pct == 80
    assert defaults.flush_memory_check_interval_s == 1
    chosen = Settings.from_env(
        {
            **env,
            "STREAM_RETENTION_MAX_ENTRIES": "0",
            "STREAM_RETENTION_PRESSURE_PCT": "0",
            "FLUSH_MEMORY_CHECK_INTERVAL_S": "0.25",
        }
    )
    assert chosen.stream_retention_max_entries == 0
    assert chosen.stream_retention_pressure_pct == 0
    assert chosen.flush_memory_check_interval_s == 0.25
    for name, value in [
        ("STREAM_RETENTION_MAX_ENTRIES", "-1"),
        ("STREAM_RETENTION_PRESSURE_PCT", "101"),
        ("STREAM_RETENTION_PRESSURE_PCT", "nan"),
        ("FLUSH_MEMORY_CHECK_INTERVAL_S", "0"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({**env, name: value})


def test_the_entries_bound_is_shared_by_the_shards() -> None:
    settings = Settings(
        redis_url="", database_url="", stream_shards=3, stream_retention_max_entries=1000
    )
    assert Retention(settings).max_entries == 334


@pytest.fixture
async def stream(redis: Redis) -> TickStream:
    [shard] = ShardMap.build(1).shards
    tick_stream = TickStream(redis, shard, GROUP, "trimmer")
    await tick_stream.ensure_group()
    return tick_stream


async def add(redis: Redis, count: int, start_ms: int = 1000) -> list[str]:
    """``count`` entries 1 ms apart, from ``start_ms``: ids that say where the time cut falls."""
    pipe = redis.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(STREAM, {"n": i}, id=f"{start_ms + i}-0")
    return [entry_id.decode() for entry_id in await pipe.execute()]


async def deliver(redis: Redis, consumer: str, count: int) -> list[str]:
    reply = await redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in reply[0][1]]


async def acknowledge(redis: Redis, count: int) -> list[str]:
    ids = await deliver(redis, "done", count)
    await redis.xack(STREAM, GROUP, *ids)
    return ids


async def remaining(redis: Redis) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await redis.xrange(STREAM)]


async def pending(redis: Redis) -> int:
    summary = await redis.xpending(STREAM, GROUP)
    return int(summary["pending"])


@pytest.mark.services
async def test_keeps_exactly_max_entries_acknowledged_below_the_oldest_pending(
    redis: Redis, stream: TickStream
) -> None:
    ids = await add(redis, 100)
    await acknowledge(redis, 60)
    held = await deliver(redis, "slow", 20)  # a slow or dead consumer holds these
    await acknowledge(redis, 10)  # acknowledged, but after a pending entry
    trimmed = await stream.trim(NO_AGE_BOUND, 25)
    assert (trimmed.by_age, trimmed.by_count, trimmed.count_bound) == (0, 35, "exact")
    assert trimmed.safe_id == held[0]
    # 25 acknowledged entries before the oldest pending one; from it on, everything.
    assert await remaining(redis) == ids[35:]
    assert await pending(redis) == 20
    again = await stream.trim(NO_AGE_BOUND, 25)
    assert again.total == 0
    assert await remaining(redis) == ids[35:]


@pytest.mark.services
async def test_no_acknowledged_history_at_all_never_trims_past_unacknowledged(
    redis: Redis, stream: TickStream
) -> None:
    ids = await add(redis, 50)
    await acknowledge(redis, 10)
    held = await deliver(redis, "slow", 5)
    await acknowledge(redis, 5)
    trimmed = await stream.trim(NO_AGE_BOUND, 0)
    assert trimmed.by_count == 10
    assert await remaining(redis) == ids[10:]
    assert trimmed.safe_id == held[0]
    # Nothing pending: all delivered entries go, the undelivered 30 stay.
    await redis.xack(STREAM, GROUP, *held)
    trimmed = await stream.trim(NO_AGE_BOUND, 0)
    assert trimmed.by_count == 10
    assert await remaining(redis) == ids[20:]
    assert trimmed.safe_id == "1019-1"  # just after the last entry delivered


@pytest.mark.services
async def test_the_newer_of_the_two_floors_wins(redis: Redis, stream: TickStream) -> None:
    ids = await add(redis, 40)
    await acknowledge(redis, 40)
    by_age = await stream.trim("1010-0", 35)  # the age floor cuts 10, the bound 5 more
    assert (by_age.by_age, by_age.by_count) == (10, 0)
    assert by_age.count_bound == "within"
    by_count = await stream.trim("1010-0", 20)  # now the bound cuts deeper than age
    assert (by_count.by_age, by_count.by_count) == (0, 10)
    assert await remaining(redis) == ids[20:]


@pytest.mark.services
async def test_another_group_that_has_not_read_keeps_everything(
    redis: Redis, stream: TickStream
) -> None:
    await add(redis, 10)
    await acknowledge(redis, 10)
    await redis.xgroup_create(STREAM, "archiver", id="0")
    trimmed = await stream.trim("99999-0", 0)
    assert trimmed.total == 0
    assert trimmed.safe_id == "0-1"
    assert await redis.xlen(STREAM) == 10


@pytest.mark.services
async def test_the_last_id_of_a_millisecond_is_followed_by_the_next_millisecond(
    redis: Redis, stream: TickStream
) -> None:
    await redis.xadd(STREAM, {"n": 1}, id="5-18446744073709551615")
    await redis.xadd(STREAM, {"n": 2}, id="6-0")
    await acknowledge(redis, 1)
    trimmed = await stream.trim(NO_AGE_BOUND, 0)
    assert (trimmed.by_count, trimmed.safe_id) == (1, "6-0")
    assert await remaining(redis) == ["6-0"]


@pytest.mark.services
async def test_a_backlog_too_long_to_count_is_cut_by_time_never_past_it(
    redis: Redis, stream: TickStream
) -> None:
    ids = await add(redis, 200)
    await acknowledge(redis, 100)  # then 100 undelivered: more than exact_max
    trimmed = await stream.trim(NO_AGE_BOUND, 40, exact_max=10)
    assert trimmed.count_bound == "estimate"
    assert 58 <= trimmed.by_count <= 60  # entries 1 ms apart: the cut falls near 60
    kept = await remaining(redis)
    assert kept == ids[trimmed.by_count :]
    # Pending entries hold it back however far the estimate would cut.
    held = await deliver(redis, "slow", 50)
    trimmed = await stream.trim(NO_AGE_BOUND, 0, exact_max=10)
    assert trimmed.count_bound == "estimate"
    assert await remaining(redis) == ids[100:]
    assert trimmed.safe_id == held[0]
    assert await pending(redis) == 50


@pytest.mark.services
async def test_memory_pressure_trims_all_acknowledged_history_and_nothing_else(
    redis: Redis, stream: TickStream
) -> None:
    ids = await add(redis, 30)
    await acknowledge(redis, 10)
    held = await deliver(redis, "slow", 5)
    await acknowledge(redis, 5)
    calm = await stream.trim(NO_AGE_BOUND, 1000, pressure_pct=100, pressure_only=True)
    assert calm.total == 0
    assert not calm.pressure
    await redis.config_set("maxmemory", str(2**40))
    try:
        # A threshold any used_memory is over: the pressure case, on a harmless limit.
        quiet = await stream.trim(NO_AGE_BOUND, 1000, pressure_pct=100, pressure_only=True)
        assert (quiet.pressure, quiet.maxmemory) == (False, 2**40)
        assert 0 < quiet.used_memory < 2**40
        pressed = await stream.trim(NO_AGE_BOUND, 1000, pressure_pct=1e-9, pressure_only=True)
    finally:
        await redis.config_set("maxmemory", "0")
    assert pressed.pressure
    assert (pressed.under_pressure, pressed.count_bound) == (10, "pressure")
    assert await remaining(redis) == ids[10:]
    assert pressed.safe_id == held[0]
    assert await pending(redis) == 5


@pytest.mark.services
async def test_a_pressure_episode_is_logged_once_and_ends_after_a_quiet_minute(
    redis: Redis, stream: TickStream, caplog: pytest.LogCaptureFixture
) -> None:
    await add(redis, 20)
    await acknowledge(redis, 20)
    settings = Settings(redis_url="", database_url="", stream_retention_pressure_pct=1e-9)
    retention = Retention(settings)
    before = REGISTRY.get_sample_value("tickpipe_flusher_trimmed_under_pressure_total") or 0
    caplog.set_level(logging.INFO, logger="tickpipe.flusher")
    await redis.config_set("maxmemory", str(2**40))
    try:
        for later in (2000, 3000, 4000):
            await retention.check_memory(stream)
            await add(redis, 5, start_ms=later)
            await acknowledge(redis, 5)
    finally:
        await redis.config_set("maxmemory", "0")
    assert retention.under_pressure
    assert REGISTRY.get_sample_value("tickpipe_flusher_memory_pressure") == 1
    after = REGISTRY.get_sample_value("tickpipe_flusher_trimmed_under_pressure_total")
    assert after == before + 30
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Redis memory pressure" in warnings[0].getMessage()
    retention.end_if_quiet(time.monotonic() + 1)
    assert retention.under_pressure
    retention.end_if_quiet(time.monotonic() + PRESSURE_QUIET_S)
    assert not retention.under_pressure
    assert REGISTRY.get_sample_value("tickpipe_flusher_memory_pressure") == 0
    assert "30 acknowledged entries trimmed under it" in caplog.records[-1].getMessage()


@pytest.mark.services
async def test_on_a_cluster_each_shard_trims_on_its_node_by_its_memory(
    redis_cluster: LocalCluster,
) -> None:
    await asyncio.to_thread(redis_cluster.wait_until_ok)
    client = redis_conn.connect_cluster(redis_cluster.url, client_name="tickpipe-tests")
    try:
        await client.flushall()
        shards = ShardMap.build(4, tagged=True).shards
        streams = [TickStream(client, shard, GROUP, "trimmer") for shard in shards]
        for stream in streams:
            await stream.ensure_group()
            for i in range(30):
                await client.xadd(stream.stream, {"n": i}, id=f"{1000 + i}-0")
            reply = await client.xreadgroup(GROUP, "done", {stream.stream: ">"}, count=20)
            await client.xack(stream.stream, GROUP, *[i for i, _ in reply[0][1]])
        by_count = await streams[0].trim(NO_AGE_BOUND, 5)
        assert (by_count.by_count, by_count.count_bound) == (15, "exact")
        await client.config_set("maxmemory", str(2**40), target_nodes=RedisCluster.PRIMARIES)
        try:
            pressed = [
                await stream.trim(NO_AGE_BOUND, 1000, pressure_pct=1e-9, pressure_only=True)
                for stream in streams
            ]
        finally:
            await client.config_set("maxmemory", "0", target_nodes=RedisCluster.PRIMARIES)
        assert [t.under_pressure for t in pressed] == [5, 20, 20, 20]
        assert [await client.xlen(stream.stream) for stream in streams] == [10, 10, 10, 10]
    finally:
        await client.aclose()
