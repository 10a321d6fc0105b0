"""STREAM_SHARDS on a single Redis: routing, one read over every shard, partial writes, DLQ."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from flusher.db import TickStore
from flusher.faults import Faults
from flusher.run import FlusherError, run_flusher
from flusher.stream import ShardedStream
from flusher.worker import Flusher
from ingest.app import create_app
from ingest.writer import APPEND_LUA
from tests import processes
from tickpipe.core import redis_conn
from tickpipe.core.settings import Settings
from tickpipe.core.shards import shard_of
from tickpipe.core.ticks import Tick, datetime_to_us
from tickpipe.lab.feeder import generate_ticks, tick_json
from tickpipe.lab.gate import MakeGate
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

AUTH = {"Authorization": "Bearer test-token-0123456789", "Content-Type": "application/json"}
SYMBOLS = tuple(f"SH{n}" for n in range(12))


def body(ticks: list[Tick]) -> bytes:
    return b"[" + b",".join(tick_json(t) for t in ticks) + b"]"


@pytest.fixture
def sharded(settings: Settings) -> Settings:
    return settings.replace(stream_shards=4)


async def tickpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``tickpipe <args>`` with four shards, unless ``env`` names another count."""
    return await processes.tickpipe({"STREAM_SHARDS": "4", **env}, *args)


async def table(pg: asyncpg.Connection) -> dict[tuple[str, int], Decimal]:
    records = await pg.fetch("SELECT symbol, ts, price FROM md_ticks")
    return {(r["symbol"], datetime_to_us(r["ts"])): r["price"] for r in records}


async def test_ticks_go_to_their_symbols_shard_and_one_flusher_reads_all(
    sharded: Settings, redis: Redis, pg: asyncpg.Connection, subprocess_env: dict[str, str]
) -> None:
    sent = generate_ticks(300, SYMBOLS, seed=1, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        response = await client.post("/ingest/ticks", data=body(sent), headers=AUTH)
        assert response.status == 200
        ids = (await response.json())["ids"]
        assert (await client.get("/readyz")).status == 200
    for shard in sharded.shard_map.shards:
        entries = await redis.xrange(shard.stream)
        mine = [
            (i, t) for i, t in zip(ids, sent, strict=True) if shard_of(t.symbol, 4) == shard.index
        ]
        assert [e.decode() for e, _ in entries] == [i for i, _ in mine]
    assert not await redis.exists("ticks.received")
    flusher = await run_flusher(sharded.replace(flusher_consumer="all"), burst=True)
    assert flusher.entries_acked == 300
    assert await table(pg) == {t.key: t.price for t in sent}
    result = await tickpipe(subprocess_env, "audit", "--json", "--verify")
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == 0, report["problems"]
    assert len(report["shards"]) == 4
    assert report["stream"]["length"] == 300
    assert report["verify"]["checked"] == 300


async def test_flusher_reads_only_its_shards(
    sharded: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    sent = generate_ticks(200, SYMBOLS, seed=2, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    await run_flusher(sharded.replace(flusher_consumer="low", flusher_shards=(0, 1)), burst=True)
    assert await table(pg) == {t.key: t.price for t in sent if shard_of(t.symbol, 4) in (0, 1)}
    await run_flusher(sharded.replace(flusher_consumer="high", flusher_shards=(2, 3)), burst=True)
    assert await table(pg) == {t.key: t.price for t in sent}


async def test_a_failing_shard_is_503_and_the_resend_completes_the_request(
    sharded: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    sent = generate_ticks(80, SYMBOLS, seed=3, start_us=1_700_000_000_000_000)
    broken = sharded.shard_map.shards[2].stream
    await redis.set(broken, "not a stream")  # every script on shard 2 fails
    async with TestClient(TestServer(create_app(sharded))) as client:
        response = await client.post("/ingest/ticks", data=body(sent), headers=AUTH)
        assert response.status == 503
        answer = await response.json()
        assert answer["error"] == "partially_stored"
        assert "resend" in answer["detail"]
        stored = sum(
            [await redis.xlen(s.stream) for s in sharded.shard_map.shards if s.stream != broken]
        )
        assert stored == sum(1 for t in sent if shard_of(t.symbol, 4) != 2)
        await redis.delete(broken)
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    await run_flusher(sharded.replace(flusher_consumer="f"), burst=True)
    assert await table(pg) == {t.key: t.price for t in sent}


async def test_dead_letters_are_listed_and_replayed_per_shard(
    sharded: Settings, redis: Redis, subprocess_env: dict[str, str]
) -> None:
    shard = sharded.shard_map.shards[2]
    dead_id = (
        await redis.xadd(
            shard.dead_stream,
            {
                "original_id": "1-0",
                "stream": shard.stream,
                "reason": "test",
                "deliveries": "5",
                "field:symbol": "X",
                "field:ts": "1",
                "field:price": "1",
                "field:volume": "1",
                "field:source": "t",
            },
        )
    ).decode()
    listed = await tickpipe(subprocess_env, "dlq", "list", "--json")
    [letter] = json.loads(listed.stdout)
    assert letter["id"] == f"2/{dead_id}"
    assert letter["shard"] == 2
    audit = await tickpipe(subprocess_env, "audit", "--json")
    assert audit.returncode == 1
    assert json.loads(audit.stdout)["dead_letters"]["length"] == 1
    replay = await tickpipe(subprocess_env, "dlq", "replay", f"2/{dead_id}")
    assert replay.returncode == 0, replay.stderr
    assert await redis.xlen(shard.dead_stream) == 0
    [(_, fields)] = await redis.xrange(shard.stream)
    assert fields[b"symbol"] == b"X"


async def read_events(
    client: TestClient[Any, Any], query: dict[str, str], count: int, last_id: str | None
) -> list[dict[str, Any]]:
    """The first ``count`` tick events of GET /ticks/stream."""
    headers = {"Authorization": AUTH["Authorization"]}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    events: list[dict[str, Any]] = []
    async with client.get("/ticks/stream", params=query, headers=headers) as response:
        assert response.status == 200, await response.text()
        current: dict[str, Any] = {}
        while len(events) < count:
            line = (await asyncio.wait_for(response.content.readline(), 30)).decode().rstrip()
            field, _, value = line.partition(":")
            if field in ("id", "event"):
                current[field] = value.strip()
            elif field == "data":
                current["data"] = json.loads(value)
            elif line == "" and current:
                if current.get("event") == "tick":
                    events.append(current)
                current = {}
    return events


async def test_event_streams_follow_one_shard_and_resume_by_its_ids(
    sharded: Settings, redis: Redis
) -> None:
    by_shard: dict[int, list[str]] = {}
    for symbol in SYMBOLS:
        by_shard.setdefault(shard_of(symbol, 4), []).append(symbol)
    shard, symbols = next((i, s) for i, s in sorted(by_shard.items()) if len(s) >= 2)
    other = next(s[0] for i, s in by_shard.items() if i != shard)
    sent = generate_ticks(120, SYMBOLS, seed=4, start_us=1_700_000_000_000_000)
    mine = [t for t in sent if t.symbol in symbols[:2]]
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
        query = {"symbols": ",".join(symbols[:2])}
        first = await read_events(client, query, len(mine) // 2, "0-0")
        rest = await read_events(client, query, len(mine) - len(first), first[-1]["id"])
        events = first + rest
        assert [(e["data"]["symbol"], e["data"]["price"]) for e in events] == [
            (t.symbol, str(t.price)) for t in mine
        ]
        stream_ids = [i.decode() for i, _ in await redis.xrange(f"ticks.received:{{{shard}}}")]
        assert [e["id"] for e in events] == [
            i for i, t in zip(stream_ids, [t for t in sent if shard_of(t.symbol, 4) == shard],
                              strict=True) if t.symbol in symbols[:2]
        ]  # fmt: skip
        whole = await read_events(client, {"shard": str(shard)}, 3, "0-0")
        assert {e["data"]["symbol"] for e in whole} <= set(symbols)
        spanning = await client.get(
            "/ticks/stream",
            params={"symbols": f"{symbols[0]},{other}"},
            headers={"Authorization": AUTH["Authorization"]},
        )
        assert spanning.status == 422
        assert f"{other}: shard {shard_of(other, 4)}" in (await spanning.json())["detail"]
        unnamed = await client.get(
            "/ticks/stream", headers={"Authorization": AUTH["Authorization"]}
        )
        assert unnamed.status == 422


# -- the deployment's shape -----------------------------------------------------------


async def test_a_flusher_with_another_stream_shards_refuses_to_start(
    sharded: Settings, redis: Redis, subprocess_env: dict[str, str]
) -> None:
    sent = generate_ticks(40, SYMBOLS, seed=5, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    assert await redis.hget("tickpipe:shape", "ticks.received") == b"4 tagged"
    with pytest.raises(FlusherError, match="tickpipe shards set 1") as refused:
        await run_flusher(sharded.replace(stream_shards=1, flusher_consumer="one"), burst=True)
    assert "runs STREAM_SHARDS=4" in str(refused.value)
    assert not await redis.exists("ticks.received")  # it read and made nothing
    check = await tickpipe({**subprocess_env, "STREAM_SHARDS": "1"}, "flusher", "run", "--check")
    assert check.returncode == 2
    assert "the deployment runs STREAM_SHARDS=4" in check.stderr


async def test_ingest_with_another_stream_shards_refuses_to_start(
    settings: Settings, redis: Redis, subprocess_env: dict[str, str]
) -> None:
    await run_flusher(settings.replace(flusher_consumer="one"), burst=True)
    assert await redis.hget("tickpipe:shape", "ticks.received") == b"1 plain"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tickpipe", "ingest", "--port", str(free_port())],
        env={**subprocess_env, "STREAM_SHARDS": "4"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "this deployment runs STREAM_SHARDS=1 with plain names" in result.stderr
    assert "Traceback" not in result.stderr


async def test_changing_stream_shards_waits_for_the_streams_to_drain(
    settings: Settings, redis: Redis, pg: asyncpg.Connection, subprocess_env: dict[str, str]
) -> None:
    one = {**subprocess_env, "STREAM_SHARDS": "1"}
    sent = generate_ticks(30, SYMBOLS, seed=6, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(settings))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    refused = await tickpipe(one, "shards", "set", "4")
    assert refused.returncode == 1
    assert "ticks.received: 0 pending, 30 undelivered" in refused.stderr
    assert await redis.hget("tickpipe:shape", "ticks.received") == b"1 plain"
    await run_flusher(settings.replace(flusher_consumer="drain"), burst=True)
    changed = await tickpipe(one, "shards", "set", "4")
    assert changed.returncode == 0, changed.stderr
    assert "now runs STREAM_SHARDS=4" in changed.stdout
    assert await redis.hget("tickpipe:shape", "ticks.received") == b"4 tagged"
    later = generate_ticks(30, SYMBOLS, seed=7, start_us=1_710_000_000_000_000)
    async with TestClient(TestServer(create_app(settings.replace(stream_shards=4)))) as client:
        assert (await client.post("/ingest/ticks", data=body(later), headers=AUTH)).status == 200
    await run_flusher(settings.replace(stream_shards=4, flusher_consumer="four"), burst=True)
    assert await table(pg) == {t.key: t.price for t in sent + later}
    audit = await tickpipe(subprocess_env, "audit", "--json")
    assert audit.returncode == 0, audit.stdout
    assert json.loads(audit.stdout)["shape"] == {"recorded": "4 tagged", "configured": "4 tagged"}


async def test_audit_finds_entries_left_in_streams_outside_the_shard_map(
    sharded: Settings, redis: Redis, subprocess_env: dict[str, str]
) -> None:
    sent = generate_ticks(60, SYMBOLS, seed=8, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    # A deployment that went from 4 shards to 1 before the shape was recorded.
    await redis.delete("tickpipe:shape")
    await run_flusher(
        sharded.replace(stream_shards=1, flusher_consumer="one"), burst=True
    )  # reads nothing: its plain stream is empty
    result = await tickpipe({**subprocess_env, "STREAM_SHARDS": "1"}, "audit", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert [o["stream"] for o in report["outside_shards"]] == [
        f"ticks.received:{{{i}}}" for i in range(4) if any(shard_of(t.symbol, 4) == i for t in sent)
    ]
    assert sum(o["undelivered"] for o in report["outside_shards"]) == 60
    assert any("outside the shard map" in problem for problem in report["problems"])
    text_report = await tickpipe({**subprocess_env, "STREAM_SHARDS": "1"}, "audit")
    assert "outside the shard map: ticks.received:{" in text_report.stdout


# -- one shard failing ----------------------------------------------------------------


class BreakShardAfterCommit(Faults):
    """Makes a shard's stream unusable right after the first COMMIT, before its XACK."""

    def __init__(self, redis: Redis, stream: str) -> None:
        super().__init__(None)
        self.redis = redis
        self.stream = stream
        self.broken = False

    async def hit(self, point: str) -> None:
        if point == "after_commit" and not self.broken:
            self.broken = True
            await break_stream(self.redis, self.stream)


async def break_stream(redis: Redis, stream: str) -> None:
    """Put the stream aside (its group and pending entries with it) and a string in its place."""
    await redis.rename(stream, f"{stream}:aside")
    await redis.set(stream, "not a stream")


async def mend_stream(redis: Redis, stream: str) -> None:
    # One step (RENAME replaces the string): a flusher never sees the stream missing,
    # where an XACK would answer 0 and leave the entries pending for a second write.
    await redis.rename(f"{stream}:aside", stream)


@asynccontextmanager
async def flusher_running(
    settings: Settings, consumer: str, faults: Faults | None = None
) -> AsyncIterator[tuple[Flusher, asyncio.Task[None]]]:
    """A flusher (not --burst) in this process, stopped at the end as SIGTERM would."""
    client = redis_conn.connect(settings.redis_url, client_name="tickpipe-tests")
    store = await TickStore.open(settings.database_url)
    streams = ShardedStream.for_consumer(client, settings, consumer)
    flusher = Flusher(streams, store, settings, faults=faults)
    task = asyncio.create_task(flusher.run())
    try:
        yield flusher, task
    finally:
        flusher.stop()
        await asyncio.wait_for(task, 60)
        await store.close()
        await client.aclose()


async def until(
    task: asyncio.Task[None], check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0
) -> None:
    """Wait for ``check`` while the flusher runs (its crash fails the test at once)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if task.done():
            task.result()
            raise AssertionError("the flusher stopped")
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def pending(redis: Redis, stream: str) -> int:
    return int((await redis.xpending(stream, "flushers"))["pending"])


async def test_a_failing_shard_does_not_stop_the_others(
    sharded: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    sent = generate_ticks(200, SYMBOLS, seed=9, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    broken = sharded.shard_map.shards[2].stream
    await break_stream(redis, broken)
    healthy = {t.key: t.price for t in sent if shard_of(t.symbol, 4) != 2}
    async with flusher_running(sharded, "f") as (_flusher, task):
        await until(task, lambda: _equals(table(pg), healthy))
        await mend_stream(redis, broken)
        await until(task, lambda: _equals(table(pg), {t.key: t.price for t in sent}))
    for shard in sharded.shard_map.shards:
        assert await pending(redis, shard.stream) == 0


async def test_an_ack_that_fails_is_kept_while_the_other_shards_go_on(
    sharded: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    first = generate_ticks(200, SYMBOLS, seed=10, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(first), headers=AUTH)).status == 200
        broken = sharded.shard_map.shards[2].stream
        faults = BreakShardAfterCommit(redis, broken)
        async with flusher_running(sharded, "f", faults) as (flusher, task):
            # The first batch held entries of every shard; all of them are written.
            await until(task, lambda: _equals(table(pg), {t.key: t.price for t in first}))
            assert faults.broken
            others = [s.stream for s in sharded.shard_map.shards if s.stream != broken]
            await until(task, lambda: _all_zero(redis, others))
            assert await pending(redis, f"{broken}:aside") > 0  # its ack waits
            # The other shards keep flowing meanwhile.
            later = [
                t
                for t in generate_ticks(120, SYMBOLS, seed=11, start_us=1_710_000_000_000_000)
                if shard_of(t.symbol, 4) != 2
            ]
            assert (
                await client.post("/ingest/ticks", data=body(later), headers=AUTH)
            ).status == 200
            expected = {t.key: t.price for t in first + later}
            await until(task, lambda: _equals(table(pg), expected))
            await mend_stream(redis, broken)
            await until(task, lambda: _all_zero(redis, [broken]))
        assert flusher.entries_acked == len(first) + len(later)


async def _equals(found: Awaitable[dict[Any, Any]], expected: dict[Any, Any]) -> bool:
    return await found == expected


async def _all_zero(redis: Redis, streams: list[str]) -> bool:
    return all([await pending(redis, stream) == 0 for stream in streams])


async def test_a_read_takes_flush_batch_size_entries_in_all_not_per_shard(
    sharded: Settings, redis: Redis
) -> None:
    sent = generate_ticks(400, SYMBOLS, seed=12, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        assert (await client.post("/ingest/ticks", data=body(sent), headers=AUTH)).status == 200
    streams = ShardedStream.for_consumer(redis, sharded, "counted")
    for stream in streams.shards:
        await stream.ensure_group()
    entries, failures = await streams.read_new(20, None)
    assert not failures
    assert len(entries) == 20  # 5 from each of the 4 shards, not 20 from each
    assert sorted(Counter(entry.shard for entry in entries).values()) == [5, 5, 5, 5]
    entries, _ = await streams.read_new(10, None, shards={1, 3})
    assert Counter(entry.shard for entry in entries) == {1: 5, 3: 5}
    entries, _ = await streams.read_new(3, None)
    assert len(entries) == 4  # at least one per shard: the total exceeds COUNT by < shards


async def test_a_bare_dead_letter_id_held_by_several_shards_is_refused(
    sharded: Settings, redis: Redis, subprocess_env: dict[str, str]
) -> None:
    shards = sharded.shard_map.shards

    async def dead_letter(shard: int, dead_id: str) -> None:
        fields = {"original_id": "1-0", "stream": shards[shard].stream, "reason": "test",
                  "deliveries": "5", "field:symbol": "X", "field:ts": "1", "field:price": "1",
                  "field:volume": "1", "field:source": "t"}  # fmt: skip
        await redis.xadd(shards[shard].dead_stream, fields, id=dead_id)

    await dead_letter(0, "5-0")
    await dead_letter(2, "5-0")
    await dead_letter(1, "6-0")
    for action in ("drop", "replay"):
        refused = await tickpipe(subprocess_env, "dlq", action, "6-0", "5-0")
        assert refused.returncode == 1
        assert "dead letter 5-0 is in several shards: 0/5-0, 2/5-0" in refused.stderr
        assert "nothing was changed" in refused.stderr
        assert [await redis.xlen(s.dead_stream) for s in shards] == [1, 1, 1, 0]
    replayed = await tickpipe(subprocess_env, "dlq", "replay", "6-0", "2/5-0")
    assert replayed.returncode == 0, replayed.stderr
    assert [await redis.xlen(s.dead_stream) for s in shards] == [1, 0, 0, 0]
    assert [await redis.xlen(s.stream) for s in shards] == [0, 1, 1, 0]
    dropped = await tickpipe(subprocess_env, "dlq", "drop", "5-0")  # only shard 0 holds it now
    assert dropped.returncode == 0, dropped.stderr
    assert await redis.xlen(shards[0].dead_stream) == 0


async def test_a_script_missing_twice_is_a_503_not_a_500(sharded: Settings, redis: Redis) -> None:
    client = redis_conn.connect(sharded.redis_url, client_name="tickpipe-tests")
    load = client.script_load

    async def load_then_lose(script: str) -> Any:
        sha = await load(script)
        await client.script_flush()  # as if Redis restarted again right after the load
        return sha

    client.script_load = load_then_lose  # type: ignore[method-assign]
    await client.script_flush()
    sent = generate_ticks(40, SYMBOLS, seed=13, start_us=1_700_000_000_000_000)
    try:
        async with TestClient(TestServer(create_app(sharded, redis=client))) as http:
            response = await http.post("/ingest/ticks", data=body(sent), headers=AUTH)
            assert response.status == 503
            answer = await response.json()
            assert answer["error"] == "redis_unavailable"
            assert "No matching script" in answer["detail"]
            assert response.headers["Retry-After"] == "1"
    finally:
        await client.aclose()
    assert sum([await redis.xlen(s.stream) for s in sharded.shard_map.shards]) == 0


async def test_a_connection_lost_during_a_write_of_several_shards_says_some_may_be_stored(
    sharded: Settings, redis: Redis, stack: LocalStack, make_gate: MakeGate
) -> None:
    # The scripts reach Redis and run; their replies are lost on the way back.
    await redis.script_load(APPEND_LUA)
    lossy = make_gate(stack.redis_port, lose_replies_after=b"EVALSHA")
    await lossy.open()
    client = redis_conn.connect(lossy.url, client_name="tickpipe-tests", socket_timeout_s=1.0)
    sent = generate_ticks(40, SYMBOLS, seed=14, start_us=1_700_000_000_000_000)
    try:
        async with TestClient(TestServer(create_app(sharded, redis=client))) as http:
            response = await http.post("/ingest/ticks", data=body(sent), headers=AUTH)
            assert response.status == 503
            answer = await response.json()
    finally:
        await client.aclose()
    assert answer["error"] == "redis_unavailable"
    assert "some of the ticks may be stored" in answer["detail"]
    assert "nothing was stored" not in answer["detail"]
    assert sum([await redis.xlen(s.stream) for s in sharded.shard_map.shards]) == len(sent)


async def test_verify_names_entries_shard_slash_id_like_the_dead_letters(
    sharded: Settings, redis: Redis, pg: asyncpg.Connection, subprocess_env: dict[str, str]
) -> None:
    sent = generate_ticks(80, SYMBOLS, seed=15, start_us=1_700_000_000_000_000)
    async with TestClient(TestServer(create_app(sharded))) as client:
        response = await client.post("/ingest/ticks", data=body(sent), headers=AUTH)
        ids = (await response.json())["ids"]
    await run_flusher(sharded.replace(flusher_consumer="v"), burst=True)
    gone = sent[7]
    await pg.execute("DELETE FROM md_ticks WHERE symbol = $1 AND ts = $2", gone.symbol, gone.ts)
    result = await tickpipe(subprocess_env, "audit", "--json", "--verify")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["verify"]["missing_ids"] == [f"{shard_of(gone.symbol, 4)}/{ids[7]}"]
    assert [s["pending"] for s in report["shards"]] == [0, 0, 0, 0]
