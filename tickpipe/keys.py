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

SHAPE = "tickpipe:shape"
"""Hash stream name -> the deployment's shape, ``"<shards> <tagged|plain>"`` (tickpipe/shape.py).

One key for the whole deployment, so in any one cluster slot; ingest and the
flushers refuse to start with another STREAM_SHARDS."""

SHARD_TAG = "{%d}"
"""The hash tag that ends every key of a shard when STREAM_SHARDS > 1 (see shard_key)."""


def shard_key(name: str, shard: int, shards: int, *, tagged: bool = False) -> str:
    """The name of key ``name`` in shard ``shard`` of ``shards``.

    One shard keeps the plain name (``ticks.received``), so a single-stream
    deployment is unchanged. With several, the name ends in the hash tag
    ``{shard}`` (``ticks.received:{3}``): Redis Cluster hashes only the tag, so a
    shard's stream, latest-price hash, dead letters and lost counter share one
    slot and one Lua script may touch them together. On a cluster (``tagged``)
    even a single shard is tagged: the plain names hash to different slots.
    """
    return name if shards == 1 and not tagged else f"{name}:{SHARD_TAG % shard}"
