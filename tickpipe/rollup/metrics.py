"""Prometheus metrics of one rollup worker (served with --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PASSES = Counter("tickpipe_rollup_passes", "Passes committed that claimed at least one mark.")
MARKS = Counter("tickpipe_rollup_marks", "Marks (symbol, second) rolled up and deleted.")
WINDOWS = Counter("tickpipe_rollup_windows", "Windows recomputed from md_ticks.")
CHANGED = Counter("tickpipe_rollup_changed", "md_ranges rows inserted or updated.")
EMPTIED = Counter("tickpipe_rollup_emptied", "md_ranges rows deleted: no tick left in the window.")
RETRIES = Counter("tickpipe_rollup_retries", "Passes retried because Postgres was unavailable.")
PASS_SECONDS = Histogram(
    "tickpipe_rollup_pass_seconds",
    "Time of one pass: claim, lock, recompute, upsert, commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
