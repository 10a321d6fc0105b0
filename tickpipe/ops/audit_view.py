"""The audit report as tables (rich), for people; `--json` is for programs."""

from __future__ import annotations

import msgspec
from rich.console import Console
from rich.table import Table

from tickpipe.ops.audit_report import AuditReport, ShardItem


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"


def _bytes(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    scaled, unit = size / 1024, "KiB"
    for larger in ("MiB", "GiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, larger
    return f"{scaled:.1f} {unit}"


def render(report: AuditReport, console: Console) -> None:
    shards = report.shards
    if len(shards) > 1:
        _render_shards(shards, console)
        console.print(f"totals over {len(shards)} shards:")
    stream = report.stream
    table = Table(title=f"stream {stream.name}", title_justify="left")
    for column in ("length", "first id", "oldest age", "last id", "entries added", "memory"):
        table.add_column(column)
    table.add_row(
        str(stream.length),
        stream.first_id or "-",
        _age(stream.first_age_ms),
        stream.last_id or "-",
        str(stream.entries_added if isinstance(stream.entries_added, int) else "-"),
        _bytes(stream.memory_bytes or 0),
    )
    console.print(table)
    retention = report.retention
    per_entry = (
        f", {(stream.memory_bytes or 0) / stream.length:.0f} B/entry" if stream.length else ""
    )
    console.print(
        f"retained: {stream.length} entries over {_age(stream.first_age_ms)},"
        f" {_bytes(stream.memory_bytes or 0)}{per_entry}; bounds configured here:"
        f" STREAM_RETENTION_S={retention.max_age_s:g},"
        f" STREAM_RETENTION_MAX_ENTRIES={retention.max_entries},"
        f" STREAM_RETENTION_PRESSURE_PCT={retention.pressure_pct:g}",
        highlight=False,
    )

    for group in report.groups:
        table = Table(title=f"group {group.name}", title_justify="left")
        for column in ("pending", "lag", "entries read", "last delivered"):
            table.add_column(column)
        lag = "unknown (entries past last-delivered)" if group.lag is None else str(group.lag)
        table.add_row(
            str(group.pending),
            lag,
            str(group.entries_read if group.entries_read is not None else "-"),
            group.last_delivered_id,
        )
        console.print(table)
        consumers = Table(title=f"consumers of {group.name}", title_justify="left")
        for column in ("consumer", "pending", "liveness", "idle", "oldest pending", "its age",
                       "deliveries"):  # fmt: skip
            # alive, expired (its heartbeat), never seen (sent none): kept whole.
            consumers.add_column(column, no_wrap=column == "liveness")
        for consumer in group.consumers:
            oldest = consumer.oldest_pending
            consumers.add_row(
                consumer.name,
                str(consumer.pending),
                consumer.liveness,
                _age(consumer.idle_ms),
                oldest.id if oldest else "-",
                _age(oldest.age_ms if oldest else None),
                str(oldest.deliveries) if oldest else "-",
            )
        console.print(consumers)

    stuck = report.stuck
    title = (
        f"stuck entries: {stuck.count} (idle over {stuck.idle_threshold_s:g} s"
        f" or delivered over {stuck.deliveries_threshold} times)"
    )
    if stuck.entries:
        table = Table(title=title, title_justify="left")
        for column in ("id", "consumer", "idle", "deliveries", "fields"):
            table.add_column(column)
        for entry in stuck.entries:
            table.add_row(
                entry.id,
                entry.consumer,
                _age(entry.idle_ms),
                str(entry.deliveries),
                " ".join(f"{k}={v}" for k, v in (entry.fields or {}).items()) or "(deleted)",
            )
        console.print(table)
    else:
        console.print(title)

    dead = report.dead_letters
    console.print(f"dead letters in {dead.stream}: {dead.length}")
    for letter in dead.newest or []:
        console.print(
            f"  {letter.id} (was {letter.original_id}, {letter.deliveries} deliveries):"
            f" {letter.reason}",
            highlight=False,
        )
    console.print(f"lost (deleted while pending, counted by the flushers): {report.lost}")
    deployed = report.shape
    console.print(
        f"shards: {deployed.configured} (recorded for the deployment:"
        f" {deployed.recorded or 'nothing yet'})"
    )
    for left in report.outside_shards:
        console.print(f"  outside the shard map: {left.detail}", highlight=False)

    checked = report.verify
    if checked is not None:
        console.print(
            f"verify: {checked.checked} acknowledged entries checked against md_ticks;"
            f" {checked.missing} missing, {checked.mismatched} mismatched"
            f" ({checked.skipped_unacknowledged} not yet acknowledged and"
            f" {checked.skipped_dead_lettered} dead-lettered skipped)"
        )
        for entry_id in checked.missing_ids:
            console.print(f"  missing: row of stream entry {entry_id}")
        for mismatch in checked.mismatches:
            console.print(
                f"  mismatch: {mismatch.symbol} {mismatch.ts} (entry {mismatch.id}):"
                f" expected {msgspec.to_builtins(mismatch.expected)},"
                f" found {msgspec.to_builtins(mismatch.found)}",
                highlight=False,
            )

    if report.problems:
        console.print("[bold red]NOT OK[/]: " + "; ".join(report.problems))
    else:
        console.print(
            "[bold green]OK[/]: zero lost, nothing stuck"
            + (", every acknowledged entry is in md_ticks" if checked is not None else "")
        )


def _render_shards(shards: list[ShardItem], console: Console) -> None:
    table = Table(title="shards", title_justify="left")
    for column in ("shard", "stream", "length", "first id", "oldest age", "memory", "last id",
                   "pending", "lag", "stuck", "dead letters", "lost"):  # fmt: skip
        table.add_column(column)
    for shard in shards:
        stream = shard.stream
        table.add_row(
            str(shard.index),
            stream.name,
            str(stream.length),
            stream.first_id or "-",
            _age(stream.first_age_ms),
            _bytes(stream.memory_bytes),
            stream.last_id or "-",
            str(shard.pending),
            "unknown" if shard.lag is None else str(shard.lag),
            str(shard.stuck.count),
            str(shard.dead_letters.length),
            str(shard.lost),
        )
    console.print(table)
