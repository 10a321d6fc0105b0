"""`tickpipe audit`: prove from XPENDING, XINFO and Postgres that nothing was lost.

The report is an :class:`~tickpipe.ops.audit_report.AuditReport` of a stable,
documented shape (docs/audit.md, docs/audit.schema.json), so `--json` prints
exactly what the table shows. ``--verify`` pages through the
stream (never loading it whole) and checks every acknowledged entry against
md_ticks. With STREAM_SHARDS > 1 every shard is audited on its own
(``shards``) and the top-level figures are the totals.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import asyncpg
from redis.exceptions import ResponseError

from tickpipe.core import shape
from tickpipe.core.dead_letter import ORIGINAL_ID
from tickpipe.core.dead_letter import decode as decode_dead_letter
from tickpipe.core.redis_conn import RedisClient, text, xrange_pages
from tickpipe.core.settings import Settings
from tickpipe.core.shards import Shard
from tickpipe.core.stream_ids import id_key, id_time_ms
from tickpipe.core.ticks import EPOCH, TickError, datetime_to_us, from_fields
from tickpipe.ops.audit_report import (
    LIVENESS,
    AuditReport,
    ConsumerState,
    DeadLetterItem,
    DeadLetters,
    GroupState,
    Liveness,
    Mismatch,
    OutsideShard,
    PendingEntry,
    Retention,
    RowValue,
    ShapeState,
    ShardItem,
    ShardReport,
    StreamState,
    StuckEntries,
    StuckEntry,
    VerifyReport,
    VerifyShard,
)

PAGE_SIZE = 5000
SHOWN = 20
"""Stuck entries, missing rows and mismatches listed by id (all are counted)."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    stuck_idle_s: float
    stuck_deliveries: int


def _fields(raw: dict[bytes, bytes] | None) -> dict[str, str] | None:
    return None if raw is None else {text(k): text(v) for k, v in raw.items()}


# -- Redis side ---------------------------------------------------------------------------


async def stream_report(redis: RedisClient, settings: Settings, limits: Thresholds) -> AuditReport:
    """Stream, groups, consumers, stuck entries, dead letters, lost counter: per shard, in total.

    Also the deployment's recorded shape and the streams outside the shard map
    (a STREAM_SHARDS changed without draining) that still hold entries.
    """
    shards = [await shard_report(redis, shard, limits) for shard in settings.shard_map.shards]
    if len(shards) == 1:
        # The report is the shard's: its item only sums it up, not repeats it.
        total, items = shards[0], [_shard_summary(shards[0], 0)]
    else:
        total, items = _totals(shards), [_shard_item(r, i) for i, r in enumerate(shards)]
    deployed = await shape.recorded(redis, settings.stream_name)
    outside = await shape.stranded(redis, settings, keep=shape.current_names(settings))
    return AuditReport(
        stream=total.stream,
        groups=total.groups,
        stuck=total.stuck,
        dead_letters=total.dead_letters,
        lost=total.lost,
        shards=items,
        shape=ShapeState(
            recorded=None if deployed is None else str(deployed),
            configured=str(shape.Shape.of(settings)),
        ),
        retention=Retention(
            max_age_s=settings.stream_retention_s,
            max_entries=settings.stream_retention_max_entries,
            pressure_pct=settings.stream_retention_pressure_pct,
        ),
        outside_shards=[
            OutsideShard(
                stream=left.stream,
                length=left.length,
                pending=left.pending,
                undelivered=left.undelivered,
                dead_letters=left.dead_letters,
                detail=left.describe(),
            )
            for left in outside
        ],
    )


async def shard_report(redis: RedisClient, shard: Shard, limits: Thresholds) -> ShardReport:
    """One shard's stream, groups, consumers, stuck entries, dead letters and lost counter."""
    stream = shard.stream
    now_ms = int(time.time() * 1000)
    try:
        info: dict[str, Any] = await redis.xinfo_stream(stream)
    except ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        info = {}
    first, last = info.get("first-entry"), info.get("last-entry")
    state = StreamState(
        name=stream,
        exists=bool(info),
        length=int(info.get("length", 0)),
        first_id=text(first[0]) if first else None,
        first_age_ms=max(0, now_ms - id_time_ms(text(first[0]))) if first else None,
        last_id=text(last[0]) if last else None,
        entries_added=info.get("entries-added"),
        # Sampled (MEMORY USAGE's default, 5 nodes): exact enough and O(1); SAMPLES 0
        # walks every node of the stream, blocking Redis ~3 ms per 1M entries.
        memory_bytes=await redis.memory_usage(stream) if info else 0,
    )
    groups: list[GroupState] = []
    stuck: list[StuckEntry] = []
    stuck_count = 0
    for group in await redis.xinfo_groups(stream) if info else []:
        name = text(group["name"])
        lag = group.get("lag")
        consumers = []
        for consumer in await redis.xinfo_consumers(stream, name):
            consumer_name = text(consumer["name"])
            oldest = None
            if consumer["pending"]:
                [first_pending] = await redis.xpending_range(
                    stream, name, min="-", max="+", count=1, consumername=consumer_name
                )
                oldest = PendingEntry(
                    id=text(first_pending["message_id"]),
                    age_ms=now_ms - id_time_ms(text(first_pending["message_id"])),
                    idle_ms=int(first_pending["time_since_delivered"]),
                    deliveries=int(first_pending["times_delivered"]),
                )
            liveness, heartbeat_age_ms = await _liveness(redis, shard, name, consumer_name, now_ms)
            consumers.append(
                ConsumerState(
                    name=consumer_name,
                    pending=int(consumer["pending"]),
                    liveness=liveness,
                    heartbeat_age_ms=heartbeat_age_ms,
                    idle_ms=int(consumer["idle"]),
                    oldest_pending=oldest,
                )
            )
        if lag is None:
            lag = await _lag_fallback(redis, stream, info, group)
        groups.append(
            GroupState(
                name=name,
                consumers=consumers,
                pending=int(group["pending"]),
                lag=lag,
                lag_reported_by_redis=group.get("lag") is not None,
                entries_read=group.get("entries-read"),
                last_delivered_id=text(group["last-delivered-id"]),
            )
        )
        async for entry in _pending_entries(redis, stream, name):
            idle_ms, deliveries = int(entry["time_since_delivered"]), int(entry["times_delivered"])
            if idle_ms < limits.stuck_idle_s * 1000 and deliveries <= limits.stuck_deliveries:
                continue
            stuck_count += 1
            if len(stuck) < SHOWN:
                entry_id = text(entry["message_id"])
                found: Any = await redis.xrange(stream, entry_id, entry_id)
                stuck.append(
                    StuckEntry(
                        id=entry_id,
                        stream=stream,
                        group=name,
                        consumer=text(entry["consumer"]),
                        idle_ms=idle_ms,
                        deliveries=deliveries,
                        fields=_fields(found[0][1]) if found else None,
                    )
                )
    newest: Any = await redis.xrevrange(shard.dead_stream, count=5)
    dead_letters = DeadLetters(
        stream=shard.dead_stream,
        length=await redis.xlen(shard.dead_stream),
        newest=[
            DeadLetterItem(
                id=text(dead_id),
                dead_stream=shard.dead_stream,
                original_id=letter.original_id or "",
                reason=letter.reason or "",
                deliveries=letter.deliveries,
            )
            for dead_id, letter in (
                (dead_id, decode_dead_letter({text(k): text(v) for k, v in fields.items()}))
                for dead_id, fields in newest
            )
        ],
    )
    return ShardReport(
        stream=state,
        groups=groups,
        stuck=StuckEntries(
            idle_threshold_s=limits.stuck_idle_s,
            deliveries_threshold=limits.stuck_deliveries,
            count=stuck_count,
            entries=stuck,
        ),
        dead_letters=dead_letters,
        lost=int(await redis.get(shard.lost) or 0),
    )


async def _liveness(
    redis: RedisClient, shard: Shard, group: str, consumer: str, now_ms: int
) -> tuple[Liveness, int | None]:
    """The consumer's liveness, and how long ago (ms) its last heartbeat was sent."""
    alive = await redis.exists(shard.heartbeat(group, consumer))
    last = await redis.hget(shard.heartbeats_seen(group), consumer)
    age_ms = None if last is None else max(0, now_ms - int(last))
    if alive:
        return "alive", age_ms
    return ("never seen" if last is None else "expired"), age_ms


def _shard_figures(report: ShardReport) -> tuple[int, int | None]:
    """A shard's pending and lag, summed over its groups (lag None if any is unknown)."""
    lags = [group.lag for group in report.groups]
    pending = sum(group.pending for group in report.groups)
    return pending, (None if None in lags else sum(lag or 0 for lag in lags))


def _shard_item(report: ShardReport, index: int) -> ShardItem:
    """One shard's whole report, with its index and its pending and lag summed."""
    pending, lag = _shard_figures(report)
    return ShardItem(
        index=index,
        stream=report.stream,
        groups=report.groups,
        pending=pending,
        lag=lag,
        stuck=report.stuck,
        dead_letters=report.dead_letters,
        lost=report.lost,
    )


def _shard_summary(report: ShardReport, index: int) -> ShardItem:
    """The figures of :func:`_shard_item` under the same keys, without the lists."""
    stream = report.stream
    pending, lag = _shard_figures(report)
    return ShardItem(
        index=index,
        stream=StreamState(
            name=stream.name,
            length=stream.length,
            first_id=stream.first_id,
            first_age_ms=stream.first_age_ms,
            memory_bytes=stream.memory_bytes,
        ),
        pending=pending,
        lag=lag,
        stuck=StuckEntries(count=report.stuck.count),
        dead_letters=DeadLetters(length=report.dead_letters.length),
        lost=report.lost,
    )


def _totals(shards: list[ShardReport]) -> ShardReport:
    """The figures of several shards added up (ids, which are per stream, are left out)."""
    streams = [r.stream for r in shards]
    added = [s.entries_added for s in streams]
    ages = [s.first_age_ms for s in streams if s.first_age_ms is not None]
    groups: dict[str, GroupState] = {}
    consumers: dict[str, dict[str, ConsumerState]] = {}
    for report in shards:
        for group in report.groups:
            total = groups.setdefault(
                group.name,
                GroupState(
                    name=group.name,
                    consumers=[],
                    pending=0,
                    lag=0,
                    lag_reported_by_redis=True,
                    entries_read=0,
                    last_delivered_id=None,
                ),
            )
            total.pending += group.pending
            total.lag = None if total.lag is None or group.lag is None else total.lag + group.lag
            total.lag_reported_by_redis &= group.lag_reported_by_redis
            total.entries_read = (
                None
                if total.entries_read is None or group.entries_read is None
                else total.entries_read + group.entries_read
            )
            for consumer in group.consumers:
                seen = consumers.setdefault(group.name, {}).setdefault(
                    consumer.name,
                    ConsumerState(name=consumer.name, pending=0, liveness="never seen",
                                  heartbeat_age_ms=None, idle_ms=consumer.idle_ms,
                                  oldest_pending=None),
                )  # fmt: skip
                seen.pending += consumer.pending
                # Alive if its heartbeat lives on any shard; its latest heartbeat.
                seen.liveness = min(seen.liveness, consumer.liveness, key=LIVENESS.index)
                heard = [
                    a for a in (seen.heartbeat_age_ms, consumer.heartbeat_age_ms) if a is not None
                ]
                seen.heartbeat_age_ms = min(heard) if heard else None
                seen.idle_ms = min(seen.idle_ms, consumer.idle_ms)
                oldest = consumer.oldest_pending
                if oldest and (
                    seen.oldest_pending is None or oldest.age_ms > seen.oldest_pending.age_ms
                ):
                    seen.oldest_pending = oldest
    for name, total in groups.items():
        total.consumers = list(consumers.get(name, {}).values())
    stuck = [entry for r in shards for entry in r.stuck.entries or []]
    newest = [letter for r in shards for letter in r.dead_letters.newest or []]
    return ShardReport(
        stream=StreamState(
            name=", ".join(s.name for s in streams),
            exists=any(s.exists for s in streams),
            length=sum(s.length for s in streams),
            first_id=None,
            first_age_ms=max(ages) if ages else None,
            last_id=None,
            entries_added=None if None in added else sum(a or 0 for a in added),
            memory_bytes=sum(s.memory_bytes or 0 for s in streams),
        ),
        groups=list(groups.values()),
        stuck=StuckEntries(
            idle_threshold_s=shards[0].stuck.idle_threshold_s,
            deliveries_threshold=shards[0].stuck.deliveries_threshold,
            count=sum(r.stuck.count for r in shards),
            entries=stuck[:SHOWN],
        ),
        dead_letters=DeadLetters(
            stream=", ".join(str(r.dead_letters.stream) for r in shards),
            length=sum(r.dead_letters.length for r in shards),
            newest=newest[:5],
        ),
        lost=sum(r.lost for r in shards),
    )


async def _lag_fallback(
    redis: RedisClient, stream: str, info: dict[str, Any], group: dict[str, Any]
) -> int | None:
    """Redis 7.0 reports lag as nil after deletions; derive it where the counters allow.

    None means "unknown, but not zero": there are entries past last-delivered-id.
    """
    added, read = info.get("entries-added"), group.get("entries-read")
    if added is not None and read is not None:
        return max(0, int(added) - int(read))
    last = text(group["last-delivered-id"])
    undelivered = await redis.xrange(stream, f"({last}", "+", count=1)
    return None if undelivered else 0


async def _pending_entries(
    redis: RedisClient, stream: str, group: str
) -> AsyncIterator[dict[str, Any]]:
    start = "-"
    while True:
        page = await redis.xpending_range(stream, group, min=start, max="+", count=PAGE_SIZE)
        for entry in page:
            yield entry
        if len(page) < PAGE_SIZE:
            return
        start = f"({text(page[-1]['message_id'])}"


# -- verify ----------------------------------------------------------------------------------

Row = tuple[Decimal, Decimal, str]


async def verify(
    redis: RedisClient,
    conn: asyncpg.Connection,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Every acknowledged entry still in the streams has its row, with its key's last value.

    Shard by shard: a key (its symbol) lives on one shard, so "last" is by that
    stream's order. With several shards, listed ids read ``shard/id``.
    """
    shards = settings.shard_map.shards
    results = [
        await verify_shard(redis, conn, shard, settings.group_name, progress) for shard in shards
    ]
    if len(results) == 1:
        return results[0]
    for shard, result in zip(shards, results, strict=True):
        # shard/id, as `tickpipe dlq` names dead letters.
        result.missing_ids = [f"{shard.index}/{i}" for i in result.missing_ids]
        for mismatch in result.mismatches:
            mismatch.id = f"{shard.index}/{mismatch.id}"
    return VerifyReport(
        checked=sum(r.checked for r in results),
        missing=sum(r.missing for r in results),
        missing_ids=[i for r in results for i in r.missing_ids][:SHOWN],
        mismatched=sum(r.mismatched for r in results),
        mismatches=[m for r in results for m in r.mismatches][:SHOWN],
        skipped_unacknowledged=sum(r.skipped_unacknowledged for r in results),
        skipped_dead_lettered=sum(r.skipped_dead_lettered for r in results),
        undecodable=sum(r.undecodable for r in results),
        shards=[
            VerifyShard(
                index=shard.index,
                stream=shard.stream,
                checked=r.checked,
                missing=r.missing,
                mismatched=r.mismatched,
            )
            for shard, r in zip(shards, results, strict=True)
        ],
    )


async def verify_shard(
    redis: RedisClient,
    conn: asyncpg.Connection,
    shard: Shard,
    group: str,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """:func:`verify` for one shard's stream.

    Pages through the stream; memory holds the pending and dead-lettered ids
    and the few keys whose row does not (yet) match, never the whole stream.
    """
    stream = shard.stream
    last_delivered = "0-0"
    for info in await redis.xinfo_groups(stream) if await redis.exists(stream) else []:
        if text(info["name"]) == group:
            last_delivered = text(info["last-delivered-id"])
    pending_ids = (
        {text(entry["message_id"]) async for entry in _pending_entries(redis, stream, group)}
        if last_delivered != "0-0"
        else set()
    )
    dead_ids: set[str] = set()
    async for dead_page in xrange_pages(redis, shard.dead_stream, PAGE_SIZE):
        dead_ids.update(text(fields.get(ORIGINAL_ID.encode(), b"")) for _, fields in dead_page)

    checked = skipped_unacked = skipped_dead = undecodable = 0
    missing: list[str] = []
    missing_count = 0
    # key -> (entry id, value) of an acknowledged entry whose row differs; a later
    # entry of the same key (acknowledged, or committed but not yet acknowledged)
    # may still explain the row.
    suspects: dict[tuple[str, int], tuple[str, Row, Row]] = {}
    delivered_up_to = id_key(last_delivered)
    async for page in xrange_pages(redis, stream, PAGE_SIZE):
        decoded = []
        for entry_id, fields in page:
            try:
                decoded.append((entry_id, from_fields(fields)))
            except TickError:
                undecodable += 1
        found = await _rows(conn, {tick.key for _, tick in decoded})
        for entry_id, tick in decoded:
            value: Row = (tick.price, tick.volume, tick.source)
            row = found.get(tick.key)
            acknowledged = id_key(entry_id) <= delivered_up_to and entry_id not in pending_ids
            if entry_id in dead_ids:
                skipped_dead += 1
                continue
            if not acknowledged:
                skipped_unacked += 1
                if tick.key in suspects and row == value:
                    del suspects[tick.key]
                continue
            checked += 1
            if row is None:
                missing_count += 1
                if len(missing) < SHOWN:
                    missing.append(entry_id)
            elif row == value:
                suspects.pop(tick.key, None)
            else:
                suspects[tick.key] = (entry_id, value, row)
        if progress is not None:
            progress(len(page))
    mismatches = [
        Mismatch(
            id=entry_id,
            symbol=key[0],
            ts=(EPOCH + dt.timedelta(microseconds=key[1])).isoformat(),
            expected=_row_json(value),
            found=_row_json(row),
        )
        for key, (entry_id, value, row) in list(suspects.items())[:SHOWN]
    ]
    return VerifyReport(
        checked=checked,
        missing=missing_count,
        missing_ids=missing,
        mismatched=len(suspects),
        mismatches=mismatches,
        skipped_unacknowledged=skipped_unacked,
        skipped_dead_lettered=skipped_dead,
        undecodable=undecodable,
    )


def _row_json(row: Row) -> RowValue:
    return RowValue(price=format(row[0], "f"), volume=format(row[1], "f"), source=row[2])


async def _rows(conn: asyncpg.Connection, keys: set[tuple[str, int]]) -> dict[tuple[str, int], Row]:
    if not keys:
        return {}
    symbols = [k[0] for k in keys]
    stamps = [EPOCH + dt.timedelta(microseconds=k[1]) for k in keys]
    records = await conn.fetch(
        "SELECT t.symbol, t.ts, t.price, t.volume, t.source FROM md_ticks t"
        " JOIN unnest($1::text[], $2::timestamptz[]) AS k(symbol, ts)"
        " ON t.symbol = k.symbol AND t.ts = k.ts",
        symbols,
        stamps,
    )
    return {
        (r["symbol"], datetime_to_us(r["ts"])): (r["price"], r["volume"], r["source"])
        for r in records
    }


# -- verdict -----------------------------------------------------------------------------------


def problems(report: AuditReport) -> list[str]:
    """Why the audit fails (empty when nothing is lost, mismatched, stuck or dead)."""
    found = []
    deployed = report.shape
    if deployed.recorded is not None and deployed.recorded != deployed.configured:
        found.append(
            f"the deployment runs STREAM_SHARDS shape {deployed.recorded!r}, this audit"
            f" {deployed.configured!r}: audit with the deployment's STREAM_SHARDS"
        )
    if report.outside_shards:
        found.append(
            "entries wait in streams outside the shard map, read by no flusher: "
            + "; ".join(left.detail for left in report.outside_shards)
            + f" (a STREAM_SHARDS changed without draining: {shape.DRAIN_DOC})"
        )
    if report.lost:
        found.append(f"{report.lost} entries lost (deleted from the stream while pending)")
    if report.stuck.count:
        found.append(f"{report.stuck.count} stuck entries")
    if report.dead_letters.length:
        found.append(
            f"{report.dead_letters.length} dead-lettered entries await an operator"
            " (tickpipe dlq list)"
        )
    checked = report.verify
    if checked:
        if checked.missing:
            found.append(f"{checked.missing} acknowledged entries missing from md_ticks")
        if checked.mismatched:
            found.append(f"{checked.mismatched} rows differ from their last entry")
        if checked.undecodable:
            found.append(f"{checked.undecodable} entries in the stream cannot be decoded")
    return found
