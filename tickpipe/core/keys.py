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

HEARTBEATS = ":heartbeat"
"""Appended to a shard's stream name (before its hash tag): the base of its heartbeat keys.

Each flusher refreshes ``<base>:alive:<group>:<consumer>`` (SET ... PX
FLUSH_DEAD_AFTER_S) while it runs; while that key exists its pending entries
are never claimed by another. The hash ``<base>:seen:<group>`` maps every
consumer that ever sent a heartbeat to the time (epoch ms) of its last one:
a consumer in it without a live key has died, one absent never sent any.
Both sit in their shard's slot (see heartbeat_key)."""

SHAPE = "tickpipe:shape"
"""Hash stream name -> the deployment's shape, ``"<shards> <tagged|plain>"`` (core/shape.py).

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


def heartbeat_key(base: str, group: str, consumer: str) -> str:
    """The key that says ``consumer`` of ``group`` is alive, in the shard of ``base``.

    ``base`` ends in the shard's hash tag when there is one, so the tag is the
    first brace of the name: a consumer or group name holding braces cannot
    move the key to another slot.
    """
    return f"{base}:alive:{group}:{consumer}"


def heartbeats_seen_key(base: str, group: str) -> str:
    """The hash of the consumers of ``group`` that ever sent a heartbeat, in ``base``'s shard."""
    return f"{base}:seen:{group}"
