"""Shared fixtures: one real Redis and one real Postgres for the whole test session.

They are started by the same code as `tickpipe up` (tickpipe.lab.stack), in a
temporary state directory on free ports, and stopped at the end.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import asyncpg
import pytest
from redis.asyncio import Redis

from tickpipe.core import redis_conn
from tickpipe.core.schema import apply_schema, ensure_database
from tickpipe.core.settings import Settings
from tickpipe.lab.cluster_stack import LocalCluster
from tickpipe.lab.gate import Gate, MakeGate
from tickpipe.lab.stack import (
    LocalStack,
    RedisServer,
    free_port,
    redis_server_candidates,
    redis_server_info,
)

TEST_TOKEN = "test-token-0123456789"
TEST_TOKEN_NAME = "feeder-a"


def pytest_configure(config: pytest.Config) -> None:
    # A session stopped with SIGTERM (a CI timeout, `timeout`) tears down like
    # one stopped with Ctrl-C, so its Redis and Postgres do not outlive it.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The real servers, started once per test session."""
    local = LocalStack(tmp_path_factory.mktemp("stack"), free_port(), free_port(), log=_quiet)
    try:
        local.up()
        yield local
    finally:
        local.down()


def _quiet(message: str) -> None:
    pass


def _redis_servers() -> list[RedisServer]:
    """Each kind of Redis this machine has: the system's (when present), the embedded Valkey."""
    kinds: dict[tuple[str, tuple[int, ...]], RedisServer] = {}
    for path in redis_server_candidates():
        server = redis_server_info(path)
        kinds.setdefault((server.flavor, server.version), server)
    return list(kinds.values())


REDIS_SERVERS = _redis_servers()
"""The durability and chaos tests run on every one of these."""


def server_id(server: RedisServer) -> str:
    return f"{server.flavor}-{server.version_text}"


@pytest.fixture(scope="session", params=REDIS_SERVERS, ids=server_id)
def fsync_redis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """A Redis of each kind, as `tickpipe up` starts it for INGEST_DURABILITY=fsync
    (appendfsync always where it has no WAITAOF)."""
    server: RedisServer = request.param
    local = LocalStack(
        tmp_path_factory.mktemp(server_id(server)),
        free_port(),
        free_port(),
        log=_quiet,
        durability="fsync",
        redis_server=server.path,
    )
    try:
        local.start_redis()
        yield local
    finally:
        local.stop_redis()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of 3 masters and 3 replicas, started only for the tests that ask."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), log=_quiet)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def service_env(stack: LocalStack, **extra: str) -> dict[str, str]:
    """The environment a tickpipe process needs to use the test servers."""
    return {
        "REDIS_URL": stack.redis_url,
        "DATABASE_URL": stack.database_url,
        "INGEST_TOKENS": f"{TEST_TOKEN_NAME}:{TEST_TOKEN}",
        "FLUSH_INTERVAL_S": "0.1",
        "FLUSHER_CONSUMER": "test-flusher",
        **extra,
    }


def database_url(stack: LocalStack, name: str) -> str:
    """The URL of database ``name`` of the test Postgres (made by ensure_database)."""
    return stack.database_url.rsplit("/", 1)[0] + "/" + name


async def fresh_database(stack: LocalStack, name: str, *, rollups: bool = True) -> str:
    """Database ``name`` of the test Postgres with the base schema (and the rollup one,
    unless ``rollups`` is false) and no rows."""
    url = database_url(stack, name)
    await ensure_database(url)
    await apply_schema(url, rollups=rollups)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "TRUNCATE " + ("md_ticks, md_ranges, md_ranges_dirty" if rollups else "md_ticks")
        )
    finally:
        await conn.close()
    return url


@pytest.fixture
def settings(stack: LocalStack) -> Settings:
    return Settings.from_env(service_env(stack))


@pytest.fixture
def subprocess_env(stack: LocalStack) -> dict[str, str]:
    """os.environ plus the test servers, for tickpipe processes started by a test."""
    return {**os.environ, **service_env(stack)}


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client on an empty Redis."""
    client = redis_conn.connect(settings.redis_url, client_name="tickpipe-tests")
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database whose md_ticks is empty."""
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute("TRUNCATE md_ticks")
    yield conn
    await conn.close()


@pytest.fixture
async def make_gate() -> AsyncIterator[MakeGate]:
    """Gates in front of a Redis port (tickpipe/lab/gate.py), closed at the end of the test."""
    gates: list[Gate] = []

    def make(target: int, *, lose_replies_after: bytes | None = None) -> Gate:
        gate = Gate(target, lose_replies_after=lose_replies_after)
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        await gate.close()
