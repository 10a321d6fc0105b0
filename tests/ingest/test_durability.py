"""INGEST_DURABILITY=fsync on every Redis this machine has (Redis 7.0 without WAITAOF too).

Each test runs once per kind of server (tests/conftest.py ``fsync_redis``): the
system's redis-server when present, and the embedded Valkey.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from ingest import durability
from ingest.app import create_app
from ingest.appkeys import LINK
from tests.conftest import TEST_TOKEN
from tickpipe.core import redis_conn
from tickpipe.core.redis_conn import RedisConfigError
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
TICK = {"symbol": "AAPL", "ts": 1714564800000, "price": "1.10", "volume": 1, "source": "s"}


def tick_at(ms: int) -> dict[str, Any]:
    return {**TICK, "ts": 1714564800000 + ms}


@pytest.fixture
async def fsync_client(fsync_redis: LocalStack) -> AsyncIterator[Redis]:
    client = redis_conn.connect(fsync_redis.redis_url, client_name="tickpipe-tests")
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def fsync_settings(settings: Settings, fsync_redis: LocalStack) -> Settings:
    return settings.replace(redis_url=fsync_redis.redis_url, ingest_durability="fsync")


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


def has_waitaof(stack: LocalStack) -> bool:
    record = stack._read_record()
    assert record is not None
    return record.server.has_waitaof


async def break_fsync(redis: Redis, stack: LocalStack) -> None:
    """Take away what confirms a fsync: the AOF (WAITAOF) or appendfsync always."""
    if has_waitaof(stack):
        await redis.config_set("appendonly", "no")
    else:
        await redis.config_set("appendfsync", "everysec")


async def mend_fsync(redis: Redis, stack: LocalStack) -> None:
    if has_waitaof(stack):
        await redis.config_set("appendonly", "yes")
        for _ in range(200):  # turning the AOF on starts a rewrite
            if not (await redis.info("persistence"))["aof_rewrite_in_progress"]:
                return
            await asyncio.sleep(0.05)
    else:
        await redis.config_set("appendfsync", "always")


@pytest.fixture
def quick_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durability, "RECHECK_S", 0.05)


async def test_fsync_mode_accepts_on_every_server(
    fsync_settings: Settings, fsync_client: Redis, fsync_redis: LocalStack
) -> None:
    async with serving(fsync_settings) as client:
        linked = client.app[LINK].get()
        assert linked.writer.fsync_by == ("waitaof" if has_waitaof(fsync_redis) else "always")
        response = await client.post("/ingest/ticks", json=[tick_at(1), tick_at(2)], headers=AUTH)
        assert response.status == 200, await response.text()
        assert (await response.json())["accepted"] == 2
        # After SCRIPT FLUSH the script is loaded again, still one step per request.
        await fsync_client.script_flush()
        assert (await client.post("/ingest/tick", json=tick_at(3), headers=AUTH)).status == 200
        assert (await client.get("/readyz")).status == 200
    assert await fsync_client.xlen("ticks.received") == 3


async def test_fsync_mode_refuses_to_start_without_a_way_to_confirm(
    fsync_settings: Settings, fsync_client: Redis, fsync_redis: LocalStack
) -> None:
    await break_fsync(fsync_client, fsync_redis)
    try:
        server = TestServer(create_app(fsync_settings))
        with pytest.raises(RedisConfigError) as refused:
            await server.start_server()
        await server.close()
    finally:
        await mend_fsync(fsync_client, fsync_redis)
    message = str(refused.value)
    record = fsync_redis._read_record()
    assert record is not None
    assert record.server.label in message  # names the server and its version
    if has_waitaof(fsync_redis):
        assert "appendonly no" in message
    else:
        assert "has no WAITAOF" in message
        assert "upgrade" in message
        assert "appendfsync always" in message
    assert await fsync_client.xlen("ticks.received") == 0


async def test_fsync_lost_while_running_is_503_logged_once(
    fsync_settings: Settings,
    fsync_client: Redis,
    fsync_redis: LocalStack,
    quick_recheck: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(fsync_settings) as client:
        assert (await client.post("/ingest/tick", json=tick_at(1), headers=AUTH)).status == 200
        await break_fsync(fsync_client, fsync_redis)
        try:
            await asyncio.sleep(0.3)  # the watcher notices a changed appendfsync
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="tickpipe.ingest"):
                for ms in range(2, 22):
                    response = await client.post("/ingest/tick", json=tick_at(ms), headers=AUTH)
                    assert response.status == 503
                    body = await response.json()
                    assert body["error"] == "not_durable"
                    assert response.headers["Retry-After"] == "1"
            refusals = [r for r in caplog.records if "refusing requests" in r.getMessage()]
            assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
            if not has_waitaof(fsync_redis):
                ready = await client.get("/readyz")
                assert ready.status == 503
                assert "appendfsync everysec" in (await ready.json())["detail"]
        finally:
            await mend_fsync(fsync_client, fsync_redis)
        await asyncio.sleep(0.3)
        assert (await client.post("/ingest/tick", json=tick_at(30), headers=AUTH)).status == 200
    # Nothing refused was appended (an appended-but-unconfirmed write is 503 too, and
    # resending it is harmless; with appendfsync everysec nothing is appended at all).
    if not has_waitaof(fsync_redis):
        assert await fsync_client.xlen("ticks.received") == 2


def test_ingest_process_exits_at_once_with_the_reason(
    fsync_redis: LocalStack, subprocess_env: dict[str, str]
) -> None:
    env = {**subprocess_env, "REDIS_URL": fsync_redis.redis_url, "INGEST_DURABILITY": "fsync"}
    env["INGEST_PORT"] = str(free_port())
    asyncio.run(_set(fsync_redis, broken=True))
    try:
        run = subprocess.run(
            [sys.executable, "-m", "tickpipe", "ingest"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        asyncio.run(_set(fsync_redis, broken=False))
    assert run.returncode != 0
    assert "INGEST_DURABILITY=fsync" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr


async def _set(stack: LocalStack, *, broken: bool) -> None:
    client = redis_conn.connect(stack.redis_url, client_name="tickpipe-tests")
    try:
        if broken:
            await break_fsync(client, stack)
        else:
            await mend_fsync(client, stack)
    finally:
        await client.aclose()
