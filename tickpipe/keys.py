"""Redis key names shared by ingest, flusher and audit (the stream contract)."""

STREAM = "ticks.received"
"""Every accepted tick is one entry of this stream."""

GROUP = "flushers"
"""The consumer group the competing flushers read through."""

DEAD_STREAM = "ticks.dead"
"""Entries that could not be written after FLUSH_MAX_DELIVERIES attempts."""

LATEST = "ticks:latest"
"""Hash symbol -> newest tick of that symbol, updated atomically with the XADD."""

LOST = "ticks:lost"
"""Counter of entries the flushers found deleted while pending (never written)."""

ENTRY_FIELDS = ("symbol", "ts", "price", "volume", "source")
"""The fields of one stream entry, in order; all strings, ``ts`` in epoch microseconds."""
