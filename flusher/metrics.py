"""Prometheus metrics of one flusher process (served with --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCHES = Counter("tickpipe_flusher_batches", "Batches committed and acknowledged.")
ROWS = Counter("tickpipe_flusher_rows", "Rows upserted into md_ticks (after dedupe).")
READS = Counter(
    "tickpipe_flusher_reads",
    "XREADGROUP commands sent (new entries and own pending ones); over"
    " tickpipe_flusher_batches, the reads a batch takes.",
)
FLUSH_SECONDS = Histogram(
    "tickpipe_flusher_flush_seconds",
    "Time to write and acknowledge one batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
COMMIT_LAG = Histogram(
    "tickpipe_flusher_commit_lag_seconds",
    "Per batch: from its oldest entry's creation (the entry id) to the COMMIT; an upper"
    " bound on the commit lag of every tick in the batch.",
    buckets=(
        0.01,
        0.025,
        0.05,
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
        1.1,
        1.2,
        1.3,
        1.4,
        1.5,
        2.0,
        3.0,
        5.0,
        10.0,
        30.0,
        60.0,
        300.0,
    ),
)
RECLAIMED = Counter(
    "tickpipe_flusher_reclaimed",
    "Entries reclaimed from other consumers (heartbeat expired, or idle past FLUSH_CLAIM_IDLE_S).",
)
LATE_COMMITS = Counter(
    "tickpipe_flusher_late_commits",
    "Batches committed after a peer had taken over and acknowledged some of their entries"
    " (this flusher's heartbeat was silent: frozen, starved); harmless, md_ticks keeps each"
    " key's latest entry.",
)
LATE_COMMIT_ENTRIES = Counter(
    "tickpipe_flusher_late_commit_entries",
    "Entries of late commits (see tickpipe_flusher_late_commits) found acknowledged already.",
)
DEAD_LETTERED = Counter(
    "tickpipe_flusher_dead_lettered", "Entries moved to the dead-letter stream."
)
LOST = Counter("tickpipe_flusher_lost", "Entries found deleted while pending (never written).")
TRIMMED = Counter("tickpipe_flusher_trimmed", "Acknowledged entries trimmed from the stream.")
PENDING = Gauge("tickpipe_flusher_pending", "Entries delivered and not yet acknowledged (group).")
LAG = Gauge("tickpipe_flusher_lag", "Entries not yet delivered to any consumer (group).")
OLDEST_PENDING = Gauge(
    "tickpipe_flusher_oldest_pending_seconds",
    "Age (from its stream id) of the oldest entry delivered and not yet acknowledged, over all"
    " shards (group); 0 when none is pending. Past FLUSH_CLAIM_IDLE_S an entry is stuck.",
)
TRIMMED_UNDER_PRESSURE = Counter(
    "tickpipe_flusher_trimmed_under_pressure",
    "Acknowledged entries trimmed because Redis memory was over STREAM_RETENTION_PRESSURE_PCT"
    " of maxmemory (also counted in tickpipe_flusher_trimmed).",
)
MEMORY_PRESSURE = Gauge(
    "tickpipe_flusher_memory_pressure",
    "1 during a memory-pressure episode: Redis memory was over STREAM_RETENTION_PRESSURE_PCT"
    " of maxmemory within the last minute; else 0.",
)
