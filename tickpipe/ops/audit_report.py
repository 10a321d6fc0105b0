"""The report of `tickpipe audit`, as msgspec structs: what `--json` prints.

Its shape is documented in docs/audit.md and published as a JSON Schema,
docs/audit.schema.json (`tickpipe audit --schema` prints it). Fields are added
over time, never renamed or removed. A field that some items leave out (a
summary carries fewer) is ``UNSET`` there, and absent from the JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

Liveness = Literal["alive", "expired", "never seen"]
"""A consumer's heartbeat: its key lives; it sent some, its key expired; it never sent one."""
LIVENESS: tuple[Liveness, ...] = ("alive", "expired", "never seen")

StreamId = Annotated[str, Meta(pattern=r"^\d+-\d+$")]
Ms = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]


class StreamState(Struct, kw_only=True):
    """A stream and what it retains. A shard's summary leaves out exists, last_id and
    entries_added; the totals of several shards have null ids (ids are per stream)."""

    name: Annotated[str, Meta(description="The stream's key; of several shards, all joined.")]
    exists: bool | UnsetType = UNSET
    length: Count
    first_id: StreamId | None
    first_age_ms: Annotated[
        int | None, Meta(description="How old the oldest entry is (ms); null: empty.")
    ]
    last_id: StreamId | UnsetType | None = UNSET
    entries_added: int | UnsetType | None = UNSET
    memory_bytes: Annotated[
        int | None, Meta(description="MEMORY USAGE, sampled (5 nodes; constant time).")
    ]


class PendingEntry(Struct, kw_only=True):
    """A consumer's oldest pending entry."""

    id: StreamId
    age_ms: int
    idle_ms: Ms
    deliveries: Count


class ConsumerState(Struct, kw_only=True):
    name: str
    pending: Count
    liveness: Annotated[Liveness, Meta(description="Its heartbeat (docs/audit.md).")]
    heartbeat_age_ms: Annotated[
        int | None, Meta(description="Since its last heartbeat; null: never seen.")
    ]
    idle_ms: Ms
    oldest_pending: PendingEntry | None


class GroupState(Struct, kw_only=True):
    """A consumer group. In the totals of several shards, last_delivered_id is null."""

    name: str
    consumers: list[ConsumerState]
    pending: Count
    lag: Annotated[
        int | None,
        Meta(description="Null: unknown (Redis 7.0 after deletions), not zero."),
    ]
    lag_reported_by_redis: Annotated[
        bool, Meta(description="False: derived from entries-added - entries-read.")
    ]
    entries_read: int | None
    last_delivered_id: StreamId | None


class StuckEntry(Struct, kw_only=True):
    """A pending entry idle or delivered over the thresholds."""

    id: StreamId
    stream: str
    group: str
    consumer: str
    idle_ms: Ms
    deliveries: Count
    fields: Annotated[dict[str, str] | None, Meta(description="The entry's fields; null: deleted.")]


class StuckEntries(Struct, kw_only=True):
    """Stuck entries: all counted, at most 20 listed. A shard's summary has the count only."""

    idle_threshold_s: float | UnsetType = UNSET
    deliveries_threshold: int | UnsetType = UNSET
    count: Count
    entries: list[StuckEntry] | UnsetType = UNSET


class DeadLetterItem(Struct, kw_only=True):
    id: StreamId
    dead_stream: str
    original_id: str
    reason: str
    deliveries: int


class DeadLetters(Struct, kw_only=True):
    """The dead-letter stream: its length and newest letters (a shard's summary: the length)."""

    stream: str | UnsetType = UNSET
    length: Count
    newest: list[DeadLetterItem] | UnsetType = UNSET


class ShardItem(Struct, kw_only=True):
    """One shard: its whole report with several shards; with one, a summary without the
    lists (the report itself is the shard's)."""

    index: Count
    stream: StreamState
    groups: list[GroupState] | UnsetType = UNSET
    pending: Annotated[Count, Meta(description="Summed over its groups.")]
    lag: Annotated[int | None, Meta(description="Summed over its groups; null: unknown.")]
    stuck: StuckEntries
    dead_letters: DeadLetters
    lost: Count


class ShapeState(Struct, kw_only=True):
    """STREAM_SHARDS as recorded for the deployment and as configured here (docs/scaling.md)."""

    recorded: str | None
    configured: str


class Retention(Struct, kw_only=True):
    """The bounds of the retained history as configured where the audit runs."""

    max_age_s: float
    max_entries: int
    pressure_pct: float


class OutsideShard(Struct, kw_only=True):
    """Work left in a stream outside the shard map (a STREAM_SHARDS change)."""

    stream: str
    length: Count
    pending: Count
    undelivered: int | None
    dead_letters: bool
    detail: str


class RowValue(Struct, kw_only=True):
    """A tick's value, decimals as exact strings."""

    price: str
    volume: str
    source: str


class Mismatch(Struct, kw_only=True):
    """An acknowledged entry whose row holds another value."""

    id: str
    symbol: str
    ts: str
    expected: RowValue
    found: RowValue


class VerifyShard(Struct, kw_only=True):
    index: Count
    stream: str
    checked: Count
    missing: Count
    mismatched: Count


class VerifyReport(Struct, kw_only=True):
    """`--verify`: acknowledged entries checked against md_ticks. With several shards,
    ids read ``shard/id`` and ``shards`` has each shard's figures."""

    checked: Count
    missing: Count
    missing_ids: list[str]
    mismatched: Count
    mismatches: list[Mismatch]
    skipped_unacknowledged: Count
    skipped_dead_lettered: Count
    undecodable: Count
    shards: list[VerifyShard] | UnsetType = UNSET


class ShardReport(Struct, kw_only=True):
    """One shard's stream, groups, stuck entries, dead letters and lost counter; with
    several shards, the report's are their totals."""

    stream: StreamState
    groups: list[GroupState]
    stuck: StuckEntries
    dead_letters: DeadLetters
    lost: Annotated[Count, Meta(description="Entries deleted while pending (ticks:lost).")]


class AuditReport(ShardReport, kw_only=True):
    """The report of `tickpipe audit --json` (docs/audit.md)."""

    shards: list[ShardItem]
    shape: ShapeState
    retention: Retention
    outside_shards: list[OutsideShard]
    verify: Annotated[VerifyReport | None, Meta(description="Null without --verify.")] = None
    problems: list[str] = field(default_factory=list)
    ok: bool = True


def json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of :class:`AuditReport`."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tickpipe audit --json",
        **msgspec.json.schema(AuditReport),
    }


def json_schema_text() -> bytes:
    """:func:`json_schema` as docs/audit.schema.json holds it (and `--schema` prints it)."""
    return msgspec.json.format(msgspec.json.encode(json_schema()), indent=2) + b"\n"
