"""Opening Redis: whether it is a cluster is asked, never guessed (tickpipe/core/redis_conn.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError, DataError

from tests.processes import tickpipe
from tickpipe.core import redis_conn
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import free_port

pytestmark = pytest.mark.services


async def test_an_unreachable_redis_is_not_taken_for_a_single_one() -> None:
    with pytest.raises(ConnectionError):
        await redis_conn.open_client(
            f"redis://127.0.0.1:{free_port()}/0", None, client_name="tickpipe-tests"
        )


async def test_waiting_gives_up_when_asked_to_stop(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()
    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    waiting = asyncio.create_task(
        redis_conn.open_client_when_ready(url, None, client_name="tickpipe-tests", stop=stop)
    )
    deadline = time.monotonic() + 30
    while "to answer whether it is a cluster" not in caplog.text:
        assert time.monotonic() < deadline, "no word of the wait"
        await asyncio.sleep(0.05)
    stop.set()
    assert await waiting is None
    assert "secret" not in caplog.text
    assert "user:***@127.0.0.1" in caplog.text


async def test_redis_cluster_1_on_a_single_redis_is_a_configuration_error(
    settings: Settings, redis: Redis
) -> None:
    with pytest.raises(redis_conn.RedisConfigError, match="set REDIS_CLUSTER=0"):
        await redis_conn.open_client(settings.redis_url, True, client_name="tickpipe-tests")


async def test_a_flusher_told_redis_is_a_cluster_stops_saying_what_to_fix(
    subprocess_env: dict[str, str], redis: Redis
) -> None:
    result = await tickpipe({**subprocess_env, "REDIS_CLUSTER": "1"}, "flusher", "run", "--burst")
    assert result.returncode == 1
    assert "is not a cluster" in result.stderr
    assert "REDIS_CLUSTER=0" in result.stderr
    assert "Traceback" not in result.stderr


async def test_ingest_told_redis_is_a_cluster_refuses_to_start(
    subprocess_env: dict[str, str], redis: Redis
) -> None:
    result = await tickpipe(
        {**subprocess_env, "REDIS_CLUSTER": "1"}, "ingest", "--port", str(free_port())
    )
    assert result.returncode == 1
    assert "is not a cluster" in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_are_packed_in_c_byte_for_byte_as_redis_py_packs_them() -> None:
    client = redis_conn.connect("redis://127.0.0.1:1/0", client_name="tickpipe-tests")
    connection = client.connection_pool.connection_class()
    python_packer = Connection()
    for command in [
        ("EVALSHA", "f" * 40, 2, "ticks", "latest", "AAPL", "1714564800000000", "1.10", "0", "x"),
        ("CONFIG GET", "appendfsync"),
        (b"CLIENT SETNAME", "name"),
        ("SET", "ünïcode", b"\x00\xff", 1.5, -7),
    ]:
        assert b"".join(connection.pack_command(*command)) == b"".join(
            python_packer.pack_command(*command)
        )
    for bad in (None, True):
        with pytest.raises(DataError):
            connection.pack_command("SET", "key", bad)  # type: ignore[arg-type]


async def test_a_c_packing_client_speaks_to_redis(settings: Settings) -> None:
    client = redis_conn.connect(settings.redis_url, client_name="tickpipe-tests")
    try:
        await client.set("tickpipe-tests:packed", "ünïcode")
        assert await client.get("tickpipe-tests:packed") == "ünïcode".encode()
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr("tickpipe-tests:packed-n")
            pipe.config_get("appendonly")
            count, config = await pipe.execute()
        assert count >= 1
        assert "appendonly" in config
    finally:
        await client.delete("tickpipe-tests:packed", "tickpipe-tests:packed-n")
        await client.aclose()
