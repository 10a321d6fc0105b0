"""The formats ingest writes in Lua agree with their one definition in tickpipe/core."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from ingest.writer import TickWriter
from tickpipe.core.keys import ENTRY_FIELDS
from tickpipe.core.latest_price import LATEST_FIELDS, decode_latest
from tickpipe.core.ticks import Tick, from_fields

pytestmark = pytest.mark.services


async def test_the_script_writes_the_entry_fields_and_the_latest_price_of_core(
    redis: Redis,
) -> None:
    stream, latest = f"formats-{uuid.uuid4().hex}", f"formats-latest-{uuid.uuid4().hex}"
    tick = Tick("FMT.A", 1_700_000_000_123_456, Decimal("1.50"), Decimal("0"), 'say "hi"\\')
    writer = TickWriter(redis, stream, latest)
    try:
        [entry_id] = await writer.append([tick], size=100, token="test")
        [(_, fields)] = await redis.xrange(stream)
        assert [name.decode() for name in fields] == list(ENTRY_FIELDS)
        assert from_fields(fields) == tick
        raw = await redis.hget(latest, tick.symbol)
        assert raw is not None
        assert list(json.loads(raw)) == list(LATEST_FIELDS)
        assert decode_latest(tick.symbol, raw) == tick
        assert f'"id":"{entry_id}"'.encode() in raw
    finally:
        await writer.close()
        await redis.delete(stream, latest)
