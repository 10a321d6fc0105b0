"""TickClient against a real ingest: outages mid-send, backpressure, refused ticks."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from ingest.app import create_app
from tests.client.conftest import (
    Services,
    count_rows,
    eventually,
    expected,
    make_ticks,
    stored,
)
from tests.conftest import TEST_TOKEN
from tickpipe.client import (
    ClientError,
    RequestRejected,
    SyncTickClient,
    TickClient,
    TickRejected,
    TicksFailed,
    Unavailable,
)
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services


async def send_all(client: TickClient, ticks: list[dict[str, object]]) -> None:
    await client.send_many(ticks)
    await client.close()


@pytest.fixture
async def ingest_server(settings: Settings, redis: Redis) -> AsyncIterator[TestServer]:
    """An in-process ingest on the session's (emptied) Redis."""
    async with TestServer(create_app(settings)) as server:
        yield server


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


# -- outages mid-send ------------------------------------------------------------------------


async def test_ingest_killed_and_restarted_mid_send_every_tick_lands_once(
    services: Services, redis: Redis, pg: asyncpg.Connection
) -> None:
    port = free_port()
    ingest = await services.ingest(port)
    services.flusher("client-flusher")
    ticks = make_ticks(40_000)
    client = TickClient(f"http://127.0.0.1:{port}", TEST_TOKEN, max_batch=200, linger_ms=1)
    sending = asyncio.create_task(send_all(client, ticks))

    await eventually(lambda: client.stats.accepted >= 4000)
    ingest.send_signal(signal.SIGKILL)  # answers in flight are lost: those batches are resent
    ingest.wait()
    await eventually(lambda: client.stats.retries["connection"] >= 3)
    assert client.stats.accepted < len(ticks)
    await services.ingest(port)
    await sending

    assert client.stats.accepted == len(ticks)
    assert client.stats.failed == 0
    await eventually(lambda: _rows_are(pg, len(ticks)))
    assert await stored(pg) == expected(ticks)


async def test_redis_killed_mid_send_every_tick_lands_once(
    services: Services, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    # A Redis of this test's own (the session's stays up), durable on every write:
    # INGEST_DURABILITY=fsync acknowledges only ticks that survive a kill -9.
    own = LocalStack(
        tmp_path / "own", free_port(), free_port(), log=lambda _m: None, durability="fsync"
    )
    own.start_redis()
    try:
        env = {"REDIS_URL": own.redis_url, "INGEST_DURABILITY": "fsync"}
        port = free_port()
        await services.ingest(port, **env)
        services.flusher("client-flusher", **env)
        ticks = make_ticks(20_000)
        client = TickClient(
            f"http://127.0.0.1:{port}", TEST_TOKEN, max_batch=200, linger_ms=1, backoff_max_s=0.5
        )
        sending = asyncio.create_task(send_all(client, ticks))

        await eventually(lambda: client.stats.accepted >= 2000)
        await asyncio.to_thread(own.stop_redis, kill=True)
        await eventually(lambda: sum(client.stats.retries.values()) >= 3)
        assert client.stats.accepted < len(ticks)
        await asyncio.to_thread(own.start_redis)
        await sending

        assert client.stats.accepted == len(ticks)
        assert client.stats.failed == 0
        await eventually(lambda: _rows_are(pg, len(ticks)))
        assert await stored(pg) == expected(ticks)
    finally:
        services.stop_all()
        own.stop_redis()


async def _rows_are(pg: asyncpg.Connection, count: int) -> bool:
    return await count_rows(pg) == count


# -- backpressure ----------------------------------------------------------------------------


async def test_429_is_waited_out_with_retry_after(
    services: Services, redis: Redis, pg: asyncpg.Connection
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    await services.ingest(port, INGEST_MAX_BACKLOG="100", INGEST_BACKLOG_POLL_S="0.05")
    ticks = make_ticks(1000)
    # No flusher yet: 200 ticks put the backlog over 100, and ingest answers 429 once it
    # has seen so, until a flusher drains it.
    async with TickClient(url, TEST_TOKEN) as first:
        await first.send_many(ticks[:200])
    await eventually(lambda: _backlog_seen(url, 200))
    client = TickClient(url, TEST_TOKEN, max_batch=50, max_in_flight=2)
    sending = asyncio.create_task(send_all(client, ticks[200:]))

    await eventually(lambda: client.stats.retries["backpressure"] >= 3)
    assert client.stats.accepted < len(ticks)
    services.flusher("late-flusher")
    await sending

    assert client.stats.accepted == len(ticks) - 200
    assert client.stats.failed == 0
    await eventually(lambda: _rows_are(pg, len(ticks)))
    assert await stored(pg) == expected(ticks)


async def _backlog_seen(url: str, entries: int) -> bool:
    """Ingest's own figure of the backlog (its 429 decision), from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    [line] = [x for x in text.splitlines() if x.startswith("tickpipe_ingest_backlog_entries ")]
    return float(line.split()[1]) >= entries


async def test_send_waits_while_the_buffer_is_full() -> None:
    # Nothing listens on the port: no tick is ever acknowledged.
    client = TickClient(
        f"http://127.0.0.1:{free_port()}", TEST_TOKEN, max_batch=5, max_buffered=10, linger_ms=0
    )
    await client.send_many(make_ticks(10))
    blocked = asyncio.create_task(client.send(make_ticks(11)[10]))
    await eventually(lambda: client.stats.retries["connection"] >= 4)
    assert not blocked.done()
    assert client.stats.sent == 10
    await client.abort()  # wakes the waiting send: it fails, nothing is left hanging
    with pytest.raises(ClientError, match="aborted"):
        await blocked


async def test_ticks_fail_as_unavailable_after_the_give_up_time() -> None:
    client = TickClient(
        f"http://127.0.0.1:{free_port()}",
        TEST_TOKEN,
        give_up_after_s=0.2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    await client.send_many(make_ticks(3), tags=["a", "b", "c"])
    with pytest.raises(TicksFailed) as failed:
        await client.close()
    assert [(f.tag, f.reason) for f in failed.value.failures] == [
        ("a", "unavailable"),
        ("b", "unavailable"),
        ("c", "unavailable"),
    ]
    error = failed.value.failures[0].error
    assert isinstance(error, Unavailable)
    assert "stayed unavailable past the give-up time" in str(error)
    assert client.stats.retries["connection"] >= 2


# -- refusals --------------------------------------------------------------------------------


async def test_a_bad_tick_fails_with_its_field_and_is_not_resent(
    ingest_server: TestServer, redis: Redis, settings: Settings
) -> None:
    ticks = make_ticks(5)
    ticks[2] = {**ticks[2], "price": "-1.5"}
    async with TickClient(base_url(ingest_server), TEST_TOKEN) as client:
        await client.send_many(ticks, tags=[f"line {n}" for n in range(2, 7)])
        with pytest.raises(TicksFailed) as failed:
            await client.flush()
    [failure] = failed.value.failures
    assert failure.tag == "line 4"
    assert failure.tick == ticks[2]
    assert isinstance(failure.error, TickRejected)
    assert (failure.error.status, failure.error.code, failure.error.field) == (
        422,
        "invalid_field",
        "price",
    )
    assert failure.reason == "invalid_field (price)"
    # One refused request, one with the four good ticks; the bad one never went again.
    assert client.stats.requests == 2
    assert (client.stats.accepted, client.stats.failed) == (4, 1)
    entries = await redis.xrange(settings.stream_name)
    assert [fields[b"price"].decode() for _, fields in entries] == [
        str(t["price"]) for t in ticks if t is not ticks[2]
    ]


async def test_a_wrong_token_fails_the_batch_without_resending(
    ingest_server: TestServer, redis: Redis, settings: Settings
) -> None:
    client = TickClient(base_url(ingest_server), "not-a-token")
    await client.send_many(make_ticks(3))
    with pytest.raises(TicksFailed) as failed:
        await client.close()
    assert [f.reason for f in failed.value.failures] == ["unauthorized"] * 3
    assert isinstance(failed.value.failures[0].error, RequestRejected)
    assert failed.value.failures[0].error.status == 401
    assert client.stats.requests == 1
    assert await redis.xlen(settings.stream_name) == 0


async def test_a_batch_over_the_servers_limit_is_split(settings: Settings, redis: Redis) -> None:
    app = create_app(settings.replace(ingest_max_batch=10))
    async with (
        TestServer(app) as server,
        TickClient(base_url(server), TEST_TOKEN, max_batch=25) as client,
    ):
        await client.send_many(make_ticks(25))
    assert (client.stats.accepted, client.stats.failed) == (25, 0)
    assert await redis.xlen(settings.stream_name) == 25


async def test_sync_client_sends_and_flushes(
    ingest_server: TestServer, redis: Redis, settings: Settings
) -> None:
    def feed() -> int:
        with SyncTickClient(base_url(ingest_server), TEST_TOKEN, max_batch=7) as client:
            for tick in make_ticks(30):
                client.send(tick)
            client.flush()
            return client.stats.accepted

    assert await asyncio.to_thread(feed) == 30
    entries = await redis.xrange(settings.stream_name)
    assert len(entries) == 30
    assert Decimal(entries[0][1][b"price"].decode()) == Decimal("1.000000000000000001")
