"""`tickpipe audit` and `tickpipe dlq` against real services."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import msgspec
import pytest
from redis.asyncio import Redis

from flusher.run import run_flusher
from flusher.stream import TickStream
from ingest.writer import TickWriter
from tests.processes import tickpipe
from tickpipe.core import dead_letter
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick
from tickpipe.lab.stack import free_port
from tickpipe.ops.audit_report import AuditReport, json_schema_text
from tickpipe.ops.dlq import REPLAY_LUA

pytestmark = pytest.mark.services


def ticks(count: int, start: int = 1_700_000_000_000_000) -> list[Tick]:
    return [
        Tick(f"A{i % 5}", start + i, Decimal(f"{i + 1}.25"), Decimal(i), "audit")
        for i in range(count)
    ]


PUBLISHED_SCHEMA = Path(__file__).resolve().parents[3] / "docs" / "audit.schema.json"


async def audit_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    """The report of `tickpipe audit --json`, checked against its published schema."""
    result = await tickpipe(env, "audit", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(
        report, json.loads(PUBLISHED_SCHEMA.read_text()), cls=jsonschema.Draft202012Validator
    )
    # The model reads it back and writes the very same bytes.
    as_model = msgspec.json.decode(result.stdout, type=AuditReport)
    assert msgspec.json.encode(as_model) + b"\n" == result.stdout.encode()
    return result.returncode, report


def test_the_published_schema_is_generated_from_the_model() -> None:
    """docs/audit.schema.json is what `tickpipe audit --schema` prints, from the model."""
    printed = subprocess.run(
        [sys.executable, "-m", "tickpipe", "audit", "--schema"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert printed.stdout == json_schema_text() == PUBLISHED_SCHEMA.read_bytes()
    jsonschema.Draft202012Validator.check_schema(json.loads(printed.stdout))


@pytest.fixture
def writer(redis: Redis, settings: Settings) -> TickWriter:
    return TickWriter(redis, settings.stream_name, settings.latest_key)


async def test_clean_run_exits_0(
    subprocess_env: dict[str, str],
    redis: Redis,
    writer: TickWriter,
    settings: Settings,
    pg: asyncpg.Connection,
) -> None:
    await writer.append(ticks(300))
    await run_flusher(settings, burst=True)
    code, report = await audit_json(subprocess_env, "--verify")
    assert code == 0
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["verify"]["checked"] == 300
    assert report["verify"]["missing"] == 0
    assert report["stream"]["length"] == 300
    [group] = report["groups"]
    assert group["name"] == "flushers"
    assert group["pending"] == 0
    assert group["lag"] == 0
    assert report["lost"] == 0
    # The retained window: oldest entry and its age, length, bytes.
    stream = report["stream"]
    [(first_id, _)] = await redis.xrange(settings.stream_name, count=1)
    assert stream["first_id"] == first_id.decode()
    assert 0 <= stream["first_age_ms"] < 60_000
    assert 300 * 20 < stream["memory_bytes"] < 300 * 200
    assert report["retention"] == {
        "max_age_s": 3600.0, "max_entries": 2_000_000, "pressure_pct": 80.0
    }  # fmt: skip
    # One shard: the report is the shard's; its item sums it up instead of repeating it.
    assert report["shards"] == [
        {"index": 0,
         "stream": {"name": "ticks.received", "length": 300, "first_id": stream["first_id"],
                    "first_age_ms": stream["first_age_ms"],
                    "memory_bytes": stream["memory_bytes"]},
         "pending": 0, "lag": 0, "stuck": {"count": 0}, "dead_letters": {"length": 0},
         "lost": 0}
    ]  # fmt: skip

    table = await tickpipe(subprocess_env, "audit", "--verify")
    assert table.returncode == 0
    assert "OK: zero lost" in table.stdout
    assert "300 acknowledged entries checked" in table.stdout
    assert "retained: 300 entries over " in table.stdout
    assert "STREAM_RETENTION_MAX_ENTRIES=2000000" in table.stdout


async def test_retained_window_of_each_shard(
    subprocess_env: dict[str, str], redis: Redis, settings: Settings
) -> None:
    sharded = TickWriter(redis, settings.stream_name, settings.latest_key, shards=2)
    older = [Tick(f"S{i}", 1, Decimal(1), Decimal(1), "audit") for i in range(8)]
    await sharded.append(older)
    await asyncio.sleep(0.3)
    await sharded.append([Tick(f"S{i}", 2, Decimal(1), Decimal(1), "audit") for i in range(8)])
    env = {**subprocess_env, "STREAM_SHARDS": "2", "STREAM_RETENTION_MAX_ENTRIES": "5000"}
    _code, report = await audit_json(env)
    shards = [shard["stream"] for shard in report["shards"]]
    assert [s["length"] for s in shards] == [
        await redis.xlen("ticks.received:{0}"),
        await redis.xlen("ticks.received:{1}"),
    ]
    for shard in shards:
        [(first, _)] = await redis.xrange(shard["name"], count=1)
        assert shard["first_id"] == first.decode()
        assert shard["first_age_ms"] >= 300
        assert shard["memory_bytes"] > 0
    total = report["stream"]
    assert total["length"] == 16
    assert total["first_age_ms"] == max(s["first_age_ms"] for s in shards)
    assert total["memory_bytes"] == sum(s["memory_bytes"] for s in shards)
    assert report["retention"]["max_entries"] == 5000
    table = await tickpipe(env, "audit")
    assert "oldest age" in table.stdout
    assert "retained: 16 entries over " in table.stdout


async def test_verify_names_a_deleted_row(
    subprocess_env: dict[str, str],
    writer: TickWriter,
    settings: Settings,
    pg: asyncpg.Connection,
) -> None:
    ids = await writer.append(ticks(50))
    await run_flusher(settings, burst=True)
    third, fourth = ticks(50)[3], ticks(50)[4]
    await pg.execute("DELETE FROM md_ticks WHERE symbol = $1 AND ts = $2", third.symbol, third.ts)
    await pg.execute(
        "UPDATE md_ticks SET price = 999 WHERE symbol = $1 AND ts = $2", fourth.symbol, fourth.ts
    )
    code, report = await audit_json(subprocess_env, "--verify")
    assert code == 1
    assert report["verify"]["missing"] == 1
    assert report["verify"]["missing_ids"] == [ids[3]]
    assert report["verify"]["mismatched"] == 1
    [mismatch] = report["verify"]["mismatches"]
    assert mismatch["id"] == ids[4]
    assert mismatch["expected"]["price"] == "5.25"
    assert mismatch["found"]["price"] == "999"
    table = await tickpipe(subprocess_env, "audit", "--verify")
    assert table.returncode == 1
    assert f"missing: row of stream entry {ids[3]}" in table.stdout


async def test_later_version_of_a_key_explains_the_row(
    subprocess_env: dict[str, str],
    writer: TickWriter,
    settings: Settings,
    pg: asyncpg.Connection,
) -> None:
    first = Tick("K", 1_700_000_000_000_000, Decimal("1"), Decimal(1), "v1")
    second = Tick("K", 1_700_000_000_000_000, Decimal("2"), Decimal(1), "v2")
    await writer.append([first])
    await writer.append([second])
    await run_flusher(settings, burst=True)
    code, report = await audit_json(subprocess_env, "--verify")
    assert code == 0, report["problems"]
    assert report["verify"]["checked"] == 2


async def test_stuck_consumer_until_reclaimed(
    subprocess_env: dict[str, str],
    writer: TickWriter,
    settings: Settings,
    redis: Redis,
    pg: asyncpg.Connection,
) -> None:
    await writer.append(ticks(80))
    victim = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tickpipe", "flusher", "run", "--consumer", "doomed"],
        env={**subprocess_env, "TICKPIPE_FAULT": "before_commit", "FLUSH_BATCH_SIZE": "50"},
        capture_output=True,
        timeout=60,
    )
    assert victim.returncode == -signal.SIGKILL
    # A consumer that never sent a heartbeat (a flusher of an older version, say),
    # and one whose heartbeat lives.
    await redis.xgroup_createconsumer("ticks.received", "flushers", "silent")
    await redis.xgroup_createconsumer("ticks.received", "flushers", "beating")
    beating = TickStream(redis, settings.shard_map.shards[0], "flushers", "beating")
    await beating.beat(60_000)

    async def doomed_has_expired() -> bool:
        _code, report = await audit_json(subprocess_env, "--stuck-idle-s", "0.2")
        [group] = report["groups"]
        doomed = next(c for c in group["consumers"] if c["name"] == "doomed")
        return bool(doomed["liveness"] == "expired")

    deadline = asyncio.get_running_loop().time() + 30
    while not await doomed_has_expired():  # its heartbeat lives FLUSH_DEAD_AFTER_S
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)
    code, report = await audit_json(subprocess_env, "--stuck-idle-s", "0.2")
    assert code == 1
    [group] = report["groups"]
    doomed = next(c for c in group["consumers"] if c["name"] == "doomed")
    assert doomed["pending"] in (50, 80)  # its batch, and the next one if already read
    assert doomed["heartbeat_age_ms"] >= 1500
    assert doomed["oldest_pending"]["idle_ms"] >= 200
    liveness = {c["name"]: c["liveness"] for c in group["consumers"]}
    assert liveness == {"doomed": "expired", "silent": "never seen", "beating": "alive"}
    assert report["stuck"]["count"] == doomed["pending"]
    assert report["stuck"]["entries"][0]["consumer"] == "doomed"
    assert report["stuck"]["entries"][0]["fields"]["symbol"].startswith("A")
    table = await tickpipe(subprocess_env, "audit", "--stuck-idle-s", "0.2")
    assert table.returncode == 1
    assert "doomed" in table.stdout
    assert "liveness" in table.stdout
    assert "expired" in table.stdout

    await run_flusher(settings, burst=True)  # takes over the dead consumer's entries at once
    code, report = await audit_json(subprocess_env, "--verify", "--stuck-idle-s", "0.2")
    assert code == 0, report["problems"]
    assert report["verify"]["checked"] == 80


async def test_dead_letter_replay_after_a_fix(
    subprocess_env: dict[str, str],
    writer: TickWriter,
    settings: Settings,
    redis: Redis,
    pg: asyncpg.Connection,
) -> None:
    await pg.execute("ALTER TABLE md_ticks ADD CONSTRAINT test_cap CHECK (price < 100)")
    try:
        await writer.append(ticks(10))  # prices 1.25 .. 10.25
        await writer.append([Tick("BIG", 1_700_000_000_000_000, Decimal("150"), Decimal(1), "x")])
        strict = settings.replace(flush_max_deliveries=1)
        await run_flusher(strict, burst=True)
        assert await redis.xlen("ticks.dead") == 1
        code, report = await audit_json(subprocess_env, "--verify")
        assert code == 1
        assert report["dead_letters"]["length"] == 1
        assert "CheckViolation" in report["dead_letters"]["newest"][0]["reason"]
        listed = await tickpipe(subprocess_env, "dlq", "list", "--json")
        [letter] = json.loads(listed.stdout)
        assert letter["fields"]["symbol"] == "BIG"
        assert letter["fields"]["price"] == "150"
    finally:
        await pg.execute("ALTER TABLE md_ticks DROP CONSTRAINT test_cap")  # the fix

    replay = await tickpipe(subprocess_env, "dlq", "replay", "--all")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith(f"replayed {letter['id']} as ")
    assert await redis.xlen("ticks.dead") == 0
    await run_flusher(settings, burst=True)
    assert await pg.fetchval("SELECT price FROM md_ticks WHERE symbol = 'BIG'") == Decimal(150)
    code, report = await audit_json(subprocess_env, "--verify")
    assert code == 0, report["problems"]


async def test_dlq_drop_needs_confirmation_for_all(
    subprocess_env: dict[str, str], redis: Redis
) -> None:
    first = (await redis.xadd("ticks.dead", {"original_id": "1-0", "field:symbol": "X"})).decode()
    await redis.xadd("ticks.dead", {"original_id": "2-0", "field:symbol": "Y"})
    refused = await tickpipe(subprocess_env, "dlq", "drop", "--all")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert await redis.xlen("ticks.dead") == 2
    one = await tickpipe(subprocess_env, "dlq", "drop", first)
    assert one.returncode == 0
    assert await redis.xlen("ticks.dead") == 1
    assert (await tickpipe(subprocess_env, "dlq", "drop", "--all", "--yes")).returncode == 0
    assert await redis.xlen("ticks.dead") == 0
    unknown = await tickpipe(subprocess_env, "dlq", "replay", "5-0")
    assert unknown.returncode == 1
    assert "no dead letter 5-0" in unknown.stderr


async def test_unreachable_servers_exit_2(subprocess_env: dict[str, str], redis: Redis) -> None:
    no_redis = {**subprocess_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = await tickpipe(no_redis, "audit")
    assert result.returncode == 2
    assert "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr
    no_pg = {
        **subprocess_env,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/tickpipe",
    }
    result = await tickpipe(no_pg, "audit", "--verify")
    assert result.returncode == 2
    assert "cannot reach Postgres" in result.stderr


async def test_lost_counter_fails_the_audit(subprocess_env: dict[str, str], redis: Redis) -> None:
    await redis.set("ticks:lost", 2)
    code, report = await audit_json(subprocess_env)
    assert code == 1
    assert report["lost"] == 2
    assert "2 entries lost" in report["problems"][0]


async def test_redis_7_0_nil_lag_is_handled() -> None:
    """Redis 7.0 answers lag nil after deletions; the audit derives it instead."""
    import fakeredis

    from tickpipe.ops.audit import Thresholds, stream_report

    class Redis70(fakeredis.FakeAsyncRedis):  # type: ignore[misc]
        async def xinfo_groups(self, name: str) -> list[dict[str, Any]]:
            groups: list[dict[str, Any]] = await super().xinfo_groups(name)
            return [{**g, "lag": None} for g in groups]

        async def memory_usage(self, key: str, samples: int | None = None) -> int:
            return 0

    redis = Redis70()
    await redis.xgroup_create("ticks.received", "flushers", id="0", mkstream=True)
    for i in range(6):
        await redis.xadd("ticks.received", {"n": str(i)})
    await redis.xreadgroup("flushers", "c", {"ticks.received": ">"}, count=2)
    report = await stream_report(redis, Settings.from_env({}), Thresholds(60, 5))
    [group] = report.groups
    assert group.lag == 4
    assert group.lag_reported_by_redis is False
    await redis.aclose()


async def test_totals_of_shards_with_consumers_keep_the_oldest_entry_age() -> None:
    import fakeredis

    from tickpipe.ops.audit import Thresholds, stream_report

    class Sampled(fakeredis.FakeAsyncRedis):  # type: ignore[misc]
        async def memory_usage(self, key: str, samples: int | None = None) -> int:
            return 100

    redis = Sampled()
    settings = Settings.from_env({"STREAM_SHARDS": "2"})
    for shard in settings.shard_map.shards:
        await redis.xgroup_create(shard.stream, "flushers", id="0", mkstream=True)
        await redis.xadd(shard.stream, {"n": "1"}, id=f"{1000 + shard.index}-0")
        await redis.xreadgroup("flushers", "c", {shard.stream: ">"}, count=1)
    await redis.hset(settings.shard_map.shards[0].heartbeats_seen("flushers"), "c", 1)
    report = await stream_report(redis, settings, Thresholds(60, 5))
    ages = [shard.stream.first_age_ms or 0 for shard in report.shards]
    assert report.stream.first_age_ms == max(ages) > 0
    await redis.aclose()


def test_a_dead_letter_reads_back_as_it_was_written() -> None:
    written = dead_letter.encode("5-1", "ticks.received", "undecodable", 3, {b"symbol": b"\xff"})
    as_text = {
        (k.decode(errors="replace") if isinstance(k, bytes) else k): (
            v.decode(errors="replace") if isinstance(v, bytes) else v
        )
        for k, v in zip(written[::2], written[1::2], strict=True)
    }
    letter = dead_letter.decode(as_text)
    assert (letter.original_id, letter.stream, letter.reason, letter.deliveries) == (
        "5-1",
        "ticks.received",
        "undecodable",
        3,
    )
    assert letter.fields == {"symbol": "\ufffd"}
    assert f"'{dead_letter.FIELD_PREFIX}'" in REPLAY_LUA
