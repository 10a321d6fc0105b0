"""Sharded streams on a real Redis Cluster (3 masters, 3 replicas): failover and resharding.

The cluster is started once per session, only when one of these tests runs
(the ``redis_cluster`` fixture); Postgres is the session's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.cluster import PRIMARY
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flusher.run import FlusherError, run_flusher
from flusher.stream import ShardedStream
from ingest.app import create_app
from ingest.writer import TickWriter
from tests.flusher.test_crashes import expected, rows
from tickpipe.core import redis_conn
from tickpipe.core.settings import Settings
from tickpipe.core.shards import shard_of
from tickpipe.core.ticks import Tick, to_fields
from tickpipe.lab.cluster_stack import LocalCluster
from tickpipe.lab.feeder import generate_ticks, tick_json, wait_ready
from tickpipe.lab.gate import Gate, MakeGate
from tickpipe.lab.processes import Processes, stop
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

TOKEN = "test-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
SHARDS = 4
SYMBOLS = tuple(f"CL{n}" for n in range(16))


def cluster_env(stack: LocalStack, cluster: LocalCluster, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": cluster.url,
        "DATABASE_URL": stack.database_url,
        "INGEST_TOKENS": f"feeder-a:{TOKEN}",
        "STREAM_SHARDS": str(SHARDS),
        "FLUSH_INTERVAL_S": "0.1",
        "FLUSH_CLAIM_IDLE_S": "2",
        "FLUSH_CLAIM_INTERVAL_S": "0.5",
        **extra,
    }


@pytest.fixture
async def cluster_client(redis_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """A client on an empty, healthy cluster."""
    await asyncio.to_thread(redis_cluster.wait_until_ok)
    client = redis_conn.connect_cluster(redis_cluster.url, client_name="tickpipe-tests")
    await client.flushall()  # every master
    yield client
    await client.aclose()


@pytest.fixture
def processes() -> Iterator[Processes]:
    # Stopped with SIGTERM: `ingest --workers N` passes it on to its workers.
    with Processes() as started:
        yield started


async def stopped(processes: Processes, proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM ``proc`` and wait: its exit status and the end of its log."""
    code = await asyncio.to_thread(stop, proc, 60)
    return code, processes.log_tail(proc)


async def audit(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tickpipe", "audit", "--verify", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


async def feed_until_acked(
    base_url: str,
    batches: list[list[Tick]],
    *,
    before_batch: Callable[[int], Awaitable[None]] | None = None,
    deadline_s: float = 120.0,
) -> tuple[list[Tick], Counter[str]]:
    """POST each batch until it is answered 200, as a feeder with retries would.

    A 5xx or a connection error may leave some of a batch stored: the batch is
    sent again whole, which is harmless (the upsert is idempotent).
    """
    acked: list[Tick] = []
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + deadline_s
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for number, batch in enumerate(batches):
            if before_batch is not None:
                await before_batch(number)
            body = b"[" + b",".join(tick_json(t) for t in batch) + b"]"
            while True:
                try:
                    async with session.post(
                        f"{base_url}/ingest/ticks", data=body, headers=HEADERS
                    ) as response:
                        await response.read()
                        answer = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    answer = type(exc).__name__
                answers[answer] += 1
                if answer == "200":
                    acked.extend(batch)
                    break
                assert time.monotonic() < deadline, f"batch {number} never accepted: {answers}"
                await asyncio.sleep(0.1)
    return acked, answers


async def wait_rows(pg: asyncpg.Connection, count: int, timeout_s: float = 90.0) -> int:
    deadline = time.monotonic() + timeout_s
    found = 0
    while time.monotonic() < deadline:
        found = await pg.fetchval("SELECT count(*) FROM md_ticks")
        if found >= count:
            return int(found)
        await asyncio.sleep(0.2)
    return int(found)


def batches_of(ticks: list[Tick], size: int) -> list[list[Tick]]:
    return [ticks[i : i + size] for i in range(0, len(ticks), size)]


async def test_sharded_ingest_and_flusher_on_a_cluster(
    stack: LocalStack,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    pg: asyncpg.Connection,
) -> None:
    # REDIS_CLUSTER is not set: tickpipe finds out from the server.
    env = cluster_env(stack, redis_cluster, INGEST_DURABILITY="replica")
    settings = Settings.from_env(env)
    sent = generate_ticks(400, SYMBOLS, seed=3, start_us=1_700_000_000_000_000, source="cl")
    async with TestClient(TestServer(create_app(settings))) as client:
        assert (await client.get("/readyz")).status == 200
        response = await client.post(
            "/ingest/ticks", data=b"[" + b",".join(tick_json(t) for t in sent) + b"]",
            headers=HEADERS,
        )  # fmt: skip
        assert response.status == 200, await response.text()
        assert (await response.json())["accepted"] == 400
    # Each shard's stream holds exactly its symbols' ticks, in the order sent.
    for shard in settings.shard_map.shards:
        entries = await cluster_client.xrange(shard.stream)
        mine = [t for t in sent if shard_of(t.symbol, SHARDS) == shard.index]
        assert [f[b"ts"].decode() for _, f in entries] == [str(t.ts_us) for t in mine]
        latest = await cluster_client.hgetall(shard.latest)
        assert {k.decode() for k in latest} == {t.symbol for t in mine}
    assert len({redis_cluster.owner_of(redis_cluster.keyslot(s.stream))
                for s in settings.shard_map.shards}) > 1  # fmt: skip
    flusher = await run_flusher(settings.replace(flusher_consumer="cl-f1"), burst=True)
    assert flusher.entries_acked == 400
    assert await rows(pg) == expected(sent)
    code, report = await audit(env)
    assert code == 0, report["problems"]
    assert report["verify"]["checked"] == 400
    assert [s["stream"]["length"] for s in report["shards"]] == [
        sum(1 for t in sent if shard_of(t.symbol, SHARDS) == i) for i in range(SHARDS)
    ]


async def test_master_killed_mid_run_loses_no_acknowledged_tick(
    stack: LocalStack,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    pg: asyncpg.Connection,
    processes: Processes,
) -> None:
    port = free_port()
    env = cluster_env(
        stack, redis_cluster, REDIS_CLUSTER="1", INGEST_DURABILITY="replica", INGEST_PORT=str(port)
    )
    processes.tickpipe("ingest", ["ingest", "--workers", "2"], {**os.environ, **env})
    for name in ("cl-a", "cl-b"):
        processes.tickpipe(name, ["flusher", "run", "--consumer", name], {**os.environ, **env})
    await wait_ready(f"http://127.0.0.1:{port}/readyz", 60.0)
    shard0 = Settings.from_env(env).shard_map.shards[0]
    victim = redis_cluster.owner_of(redis_cluster.keyslot(shard0.stream))
    healed: list[asyncio.Task[None]] = []

    async def fail_over_and_heal() -> None:
        await asyncio.to_thread(redis_cluster.wait_for_failover, victim)
        # The old master comes back as a replica of the promoted one; until then
        # INGEST_DURABILITY=replica refuses (503) what it cannot copy.
        await asyncio.to_thread(redis_cluster.restart, victim)
        await asyncio.to_thread(redis_cluster.wait_until_ok)

    async def chaos(batch: int) -> None:
        if batch == 12:
            await asyncio.to_thread(redis_cluster.kill, victim)
            healed.append(asyncio.create_task(fail_over_and_heal()))

    sent = generate_ticks(2400, SYMBOLS, seed=5, start_us=1_710_000_000_000_000, source="fo")
    acked, answers = await feed_until_acked(
        f"http://127.0.0.1:{port}", batches_of(sent, 50), before_batch=chaos
    )
    await healed[0]
    assert redis_cluster.owner_of(redis_cluster.keyslot(shard0.stream)) != victim
    assert answers["200"] == 48
    assert sum(answers.values()) > 48, answers  # the outage was felt, and retried
    assert await wait_rows(pg, len(acked)) == len(acked)
    for flusher in processes.started[1:]:
        code, log = await stopped(processes, flusher)
        assert code == 0, log
    assert await rows(pg) == expected(acked)
    assert await pg.fetchval("SELECT count(*) - count(DISTINCT (symbol, ts)) FROM md_ticks") == 0
    code, report = await audit(env)
    assert code == 0, report["problems"]
    assert report["lost"] == 0
    assert report["verify"]["missing"] == 0


async def test_resharding_mid_run_follows_moved_and_ask(
    stack: LocalStack,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    pg: asyncpg.Connection,
    processes: Processes,
) -> None:
    port = free_port()
    env = cluster_env(stack, redis_cluster, REDIS_CLUSTER="1", INGEST_PORT=str(port))
    processes.tickpipe("ingest", ["ingest"], {**os.environ, **env})
    for name in ("rs-a", "rs-b"):
        processes.tickpipe(name, ["flusher", "run", "--consumer", name], {**os.environ, **env})
    await wait_ready(f"http://127.0.0.1:{port}/readyz", 60.0)
    shard = Settings.from_env(env).shard_map.shards[1]
    slot = redis_cluster.keyslot(shard.stream)
    source = redis_cluster.owner_of(slot)
    target = next(p for p in redis_cluster.primaries() if p != source)
    moves: list[asyncio.Task[int]] = []

    async def reshard(batch: int) -> None:
        if batch == 10:
            moves.append(
                asyncio.create_task(
                    asyncio.to_thread(redis_cluster.move_slot, slot, target, pause_s=0.5)
                )
            )

    sent = generate_ticks(2000, SYMBOLS, seed=7, start_us=1_720_000_000_000_000, source="rs")
    acked, _answers = await feed_until_acked(
        f"http://127.0.0.1:{port}", batches_of(sent, 50), before_batch=reshard
    )
    assert await moves[0] >= 2  # the stream and its latest-price hash, at least
    assert redis_cluster.owner_of(slot) == target
    assert len(acked) == 2000
    assert await wait_rows(pg, len(acked)) == len(acked)
    for flusher in processes.started[1:]:
        code, log = await stopped(processes, flusher)
        assert code == 0, log
    assert await rows(pg) == expected(acked)
    code, report = await audit(env)
    assert code == 0, report["problems"]
    assert report["verify"]["checked"] >= 2000


async def test_one_shard_on_a_cluster_uses_tagged_names(
    stack: LocalStack,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    pg: asyncpg.Connection,
) -> None:
    # ticks.received and ticks:latest hash to different slots: one script cannot
    # touch both, so on a cluster even one shard is hash-tagged.
    env = cluster_env(stack, redis_cluster, STREAM_SHARDS="1")
    sent = generate_ticks(30, SYMBOLS, seed=9, start_us=1_730_000_000_000_000, source="one")
    async with TestClient(TestServer(create_app(Settings.from_env(env)))) as client:
        response = await client.post(
            "/ingest/ticks", data=b"[" + b",".join(tick_json(t) for t in sent) + b"]",
            headers=HEADERS,
        )  # fmt: skip
        assert response.status == 200, await response.text()
    assert await cluster_client.xlen("ticks.received:{0}") == 30
    assert await cluster_client.hlen("ticks:latest:{0}") == len(SYMBOLS)
    await run_flusher(Settings.from_env(env).replace(flusher_consumer="one"), burst=True)
    assert await rows(pg) == expected(sent)
    code, report = await audit(env)
    assert code == 0, report["problems"]
    assert report["stream"]["name"] == "ticks.received:{0}"


@pytest.fixture
async def gate(redis_cluster: LocalCluster, make_gate: MakeGate) -> Gate:
    return make_gate(redis_cluster.nodes[0].port)


async def wait_ready_app(client: TestClient[Any, Any], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "ingest never became ready"
        await asyncio.sleep(0.2)


async def test_ingest_started_before_the_cluster_answers_finds_out_it_is_one(
    stack: LocalStack, redis_cluster: LocalCluster, cluster_client: RedisCluster, gate: Gate
) -> None:
    # REDIS_CLUSTER=auto and nothing answers at start: ingest must not guess
    # "single Redis" (plain names: CROSSSLOT on every write, forever).
    env = cluster_env(stack, redis_cluster, STREAM_SHARDS="1", REDIS_URL=gate.url)
    sent = generate_ticks(20, SYMBOLS, seed=11, start_us=1_740_000_000_000_000, source="late")
    body = b"[" + b",".join(tick_json(t) for t in sent) + b"]"
    async with TestClient(TestServer(create_app(Settings.from_env(env)))) as client:
        refused = await client.post("/ingest/ticks", data=body, headers=HEADERS)
        assert refused.status == 503
        assert (await refused.json())["error"] == "redis_unavailable"
        assert (await client.get("/readyz")).status == 503
        await gate.open()
        await wait_ready_app(client)
        response = await client.post("/ingest/ticks", data=body, headers=HEADERS)
        assert response.status == 200, await response.text()
    assert await cluster_client.xlen("ticks.received:{0}") == 20
    assert await cluster_client.hlen("ticks:latest:{0}") == len({t.symbol for t in sent})


async def test_flusher_started_before_the_cluster_answers_waits_for_it(
    stack: LocalStack,
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    pg: asyncpg.Connection,
    gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = cluster_env(stack, redis_cluster, STREAM_SHARDS="1", REDIS_URL=gate.url)
    sent = generate_ticks(20, SYMBOLS, seed=12, start_us=1_750_000_000_000_000, source="late")
    for tick in sent:
        await cluster_client.xadd("ticks.received:{0}", to_fields(tick))  # type: ignore[arg-type]
    settings = Settings.from_env(env).replace(flusher_consumer="late")
    flusher = asyncio.create_task(run_flusher(settings, burst=True))
    deadline = time.monotonic() + 60
    while "to answer whether it is a cluster" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        assert not flusher.done(), "the flusher gave up waiting (or guessed)"
        await asyncio.sleep(0.1)
    await gate.open()
    done = await asyncio.wait_for(flusher, 120)
    assert done is not None
    assert done.entries_acked == 20
    assert await rows(pg) == expected(sent)
    assert not await cluster_client.exists("ticks.received")  # no plain stream made up


async def test_audit_scans_every_master_for_streams_outside_the_shard_map(
    stack: LocalStack, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    env = cluster_env(stack, redis_cluster)
    sent = generate_ticks(80, SYMBOLS, seed=13, start_us=1_760_000_000_000_000, source="os")
    async with TestClient(TestServer(create_app(Settings.from_env(env)))) as client:
        response = await client.post(
            "/ingest/ticks", data=b"[" + b",".join(tick_json(t) for t in sent) + b"]",
            headers=HEADERS,
        )  # fmt: skip
        assert response.status == 200, await response.text()
    await cluster_client.delete("tickpipe:shape")  # as if recorded before the change
    code, report = await audit({**env, "STREAM_SHARDS": "1"})
    assert code == 1
    outside = [left["stream"] for left in report["outside_shards"]]
    # ticks.received:{0} is the one-shard name on a cluster: it is in the map.
    assert outside == [f"ticks.received:{{{i}}}" for i in range(1, SHARDS)]
    assert len({redis_cluster.owner_of(redis_cluster.keyslot(s)) for s in outside}) > 1
    assert sum(left["undelivered"] for left in report["outside_shards"]) == sum(
        1 for t in sent if shard_of(t.symbol, SHARDS) != 0
    )


async def test_the_cluster_client_never_resends_a_command_whose_reply_was_lost(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, make_gate: MakeGate
) -> None:
    # redis-py before 6.0 ignored retry= for the cluster client's own retries:
    # after a timeout it rebuilt its slot map and sent the XADD again, a
    # duplicate entry. The master runs the command; its reply never comes back.
    key = "ticks.received:{0}"
    master = redis_cluster.owner_of(redis_cluster.keyslot(key))
    lossy = make_gate(master, lose_replies_after=b"XADD")
    await lossy.open()
    client = redis_conn.connect_cluster(
        redis_cluster.url, client_name="tickpipe-tests", socket_timeout_s=1.0
    )
    try:
        await client.initialize()
        manager = client.nodes_manager
        behind_lossy_link = ClusterNode(
            "127.0.0.1", lossy.port, PRIMARY, **manager.connection_kwargs
        )
        manager.slots_cache[redis_cluster.keyslot(key)] = [behind_lossy_link]
        with pytest.raises(RedisTimeoutError):
            await client.xadd(key, {"symbol": "X"})
    finally:
        await behind_lossy_link.disconnect()
        await client.initialize()  # after the timeout it wants a new slot map first
        await client.aclose()
    assert await cluster_client.xlen(key) == 1  # it ran once, and only once


async def test_a_read_on_a_cluster_takes_flush_batch_size_entries_in_all(
    stack: LocalStack, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    settings = Settings.from_env(cluster_env(stack, redis_cluster, REDIS_CLUSTER="1"))
    sent = generate_ticks(200, SYMBOLS, seed=14, start_us=1_770_000_000_000_000, source="cnt")
    for tick in sent:
        shard = settings.shard_map.for_symbol(tick.symbol)
        await cluster_client.xadd(shard.stream, to_fields(tick))  # type: ignore[arg-type]
    streams = ShardedStream.for_consumer(cluster_client, settings, "counted")
    for stream in streams.shards:
        await stream.ensure_group()
    entries, failures = await streams.read_new(40, None)
    assert not failures
    assert sorted(Counter(entry.shard for entry in entries).values()) == [10, 10, 10, 10]


def cluster_slots_calls(cluster: LocalCluster) -> int:
    """CLUSTER SLOTS answered by every node since the last CONFIG RESETSTAT."""
    calls = 0
    for node in cluster.nodes:
        with node.client() as client:
            stats: dict[str, Any] = client.info("commandstats")
            calls += int(stats.get("cmdstat_cluster|slots", {}).get("calls", 0))
    return calls


def reset_stats(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        with node.client() as client:
            client.config_resetstat()


async def test_the_writer_reads_the_slot_map_once_per_round_of_moved_replies(
    stack: LocalStack, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    settings = Settings.from_env(cluster_env(stack, redis_cluster, REDIS_CLUSTER="1"))
    client = redis_conn.connect_cluster(redis_cluster.url, client_name="tickpipe-tests")
    writer = TickWriter.from_settings(client, settings)
    sent = generate_ticks(40, SYMBOLS, seed=15, start_us=1_780_000_000_000_000, source="mv")
    moved = {
        shard.index: redis_cluster.keyslot(shard.stream) for shard in settings.shard_map.shards[1:3]
    }
    owners = {slot: redis_cluster.owner_of(slot) for slot in moved.values()}
    try:
        await writer.append(sent[:1])  # the writer's client has its slot map
        for slot, owner in owners.items():
            target = next(p for p in redis_cluster.primaries() if p != owner)
            await asyncio.to_thread(redis_cluster.move_slot, slot, target)
        await asyncio.to_thread(reset_stats, redis_cluster)
        # Ticks of both moved shards: two MOVED replies in the first round.
        assert {shard_of(t.symbol, SHARDS) for t in sent[1:]} >= set(moved)
        ids = await writer.append(sent[1:])
        assert len(ids) == len(sent) - 1
        assert await asyncio.to_thread(cluster_slots_calls, redis_cluster) == 1
    finally:
        await client.aclose()
        for slot, owner in owners.items():
            await asyncio.to_thread(redis_cluster.move_slot, slot, owner)


async def test_the_writer_reads_the_slot_map_again_after_losing_a_node(
    stack: LocalStack, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    settings = Settings.from_env(cluster_env(stack, redis_cluster, REDIS_CLUSTER="1"))
    client = redis_conn.connect_cluster(redis_cluster.url, client_name="tickpipe-tests")
    writer = TickWriter.from_settings(client, settings)
    tick = generate_ticks(1, SYMBOLS, seed=16, start_us=1_790_000_000_000_000, source="gone")[0]
    stream = settings.shard_map.for_symbol(tick.symbol).stream
    try:
        await client.initialize()
        # What a failover leaves in a client's map: the slot's master no longer answers.
        manager = client.nodes_manager
        gone = ClusterNode("127.0.0.1", free_port(), PRIMARY, **manager.connection_kwargs)
        manager.slots_cache[redis_cluster.keyslot(stream)] = [gone]
        with pytest.raises(RedisConnectionError):
            await writer.append([tick])  # 503: nothing stored
        assert await writer.append([tick])  # a fresh map: the slot's real master
    finally:
        await gone.disconnect()
        await client.aclose()
    assert await cluster_client.xlen(stream) == 1


async def test_a_name_with_braces_is_refused_once_the_server_says_it_is_a_cluster(
    stack: LocalStack, redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    # REDIS_CLUSTER=auto: the settings cannot tell, the server can.
    env = cluster_env(stack, redis_cluster, STREAM_SHARDS="1", STREAM_NAME="ticks{x}")
    settings = Settings.from_env(env)
    with pytest.raises(FlusherError, match="holds a brace"):
        await run_flusher(settings.replace(flusher_consumer="brace"), burst=True)
    runner = web.AppRunner(create_app(settings))
    with pytest.raises(redis_conn.RedisConfigError, match="holds a brace"):
        await runner.setup()  # ingest does not start
    await runner.cleanup()
    assert not [key async for key in cluster_client.scan_iter(match="ticks{x}*")]
