"""Rollups: OHLCV windows of md_ticks in md_ranges (docs/rollups.md).

``store.py`` is the Postgres side (claim marks, recompute windows, backfill),
``worker.py`` the loop, ``run.py`` the process; the query "which aggregates
cover time T" is ``tickpipe/core/md_ranges.py``, shared with ingest.
"""
