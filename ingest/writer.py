"""Appending ticks to the stream: one atomic Lua step per request."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from tickpipe.ticks import Tick, to_fields

# KEYS[1] the stream, KEYS[2] the latest-price hash.
# ARGV: five strings per tick (symbol, ts, price, volume, source).
# Each tick becomes one entry; the hash keeps, per symbol, the tick with the
# greatest ts (a tick with an equal ts replaces it, as it replaces the row).
# ts are non-negative integers without leading zeros, compared as strings by
# length then lexically: exact where Lua's doubles are not (above 2^53).
APPEND_LUA = """
local stream, latest = KEYS[1], KEYS[2]
local ids = {}
for i = 1, #ARGV, 5 do
  local symbol, ts = ARGV[i], ARGV[i + 1]
  local id = redis.call('XADD', stream, '*',
    'symbol', symbol, 'ts', ts, 'price', ARGV[i + 2], 'volume', ARGV[i + 3],
    'source', ARGV[i + 4])
  ids[#ids + 1] = id
  local current = redis.call('HGET', latest, symbol)
  local replace = true
  if current then
    local seen = cjson.decode(current).ts
    replace = #ts > #seen or (#ts == #seen and ts >= seen)
  end
  if replace then
    redis.call('HSET', latest, symbol, cjson.encode({
      ts = ts, price = ARGV[i + 2], volume = ARGV[i + 3], source = ARGV[i + 4], id = id}))
  end
end
return ids
"""


class TickWriter:
    """Appends validated ticks to the stream and the latest-price hash."""

    def __init__(self, redis: Redis, stream: str, latest_key: str) -> None:
        self._keys = [stream, latest_key]
        self._append = redis.register_script(APPEND_LUA)

    async def append(self, ticks: Sequence[Tick]) -> list[str]:
        """Append every tick in one round trip; returns their stream ids in order."""
        argv: list[str] = []
        for tick in ticks:
            argv.extend(to_fields(tick).values())
        ids = await self._append(keys=self._keys, args=argv)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
