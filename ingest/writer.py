"""Appending ticks to the stream: one atomic Lua step per request."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from tickpipe.ticks import Tick, to_fields

# The "#!lua" shebang (Redis 7 script flags, here none) makes Redis refuse the
# script whole when it cannot write (OOM, read-only replica) instead of failing
# at some XADD midway: a request's ticks are appended all together or not at all.
# KEYS[1] the stream, KEYS[2] the latest-price hash.
# ARGV: five strings per tick (symbol, ts, price, volume, source).
# Each tick becomes one entry; the hash keeps, per symbol, the tick with the
# greatest ts (a tick with an equal ts replaces it, as it replaces the row).
# ts are non-negative integers without leading zeros, compared as strings by
# length then lexically: exact where Lua's doubles are not (above 2^53).
APPEND_LUA = """#!lua
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


class NotDurable(Exception):
    """WAITAOF did not confirm the local AOF fsync in time (INGEST_DURABILITY=fsync)."""


class TickWriter:
    """Appends validated ticks to the stream and the latest-price hash.

    With ``fsync``, the answer waits for WAITAOF to report that the local AOF
    holds the entries on disk; WAITAOF covers the writes of its own connection,
    so it travels with the script in one pipeline: still one round trip.
    """

    def __init__(
        self,
        redis: Redis,
        stream: str,
        latest_key: str,
        *,
        fsync: bool = False,
        waitaof_timeout_ms: int = 1000,
    ) -> None:
        self._redis = redis
        self._keys = [stream, latest_key]
        self._script = redis.register_script(APPEND_LUA)
        self._fsync = fsync
        self._waitaof_timeout_ms = waitaof_timeout_ms

    async def append(self, ticks: Sequence[Tick]) -> list[str]:
        """Append every tick atomically; returns their stream ids in order."""
        argv: list[str] = []
        for tick in ticks:
            argv.extend(to_fields(tick).values())
        if self._fsync:
            ids = await self._append_fsync(argv)
        else:
            ids = await self._script(keys=self._keys, args=argv)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def _append_fsync(self, argv: list[str]) -> list[bytes]:
        for attempt in (1, 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._script.sha, len(self._keys), *self._keys, *argv)
                pipe.execute_command("WAITAOF", 1, 0, self._waitaof_timeout_ms)
                try:
                    ids, (local, _replicas) = await pipe.execute()
                except NoScriptError:
                    # The script did not run (a restarted Redis): load it and run it once more.
                    if attempt == 2:
                        raise
                    await self._redis.script_load(APPEND_LUA)
                    continue
            if int(local) < 1:
                raise NotDurable(
                    f"Redis did not confirm the AOF fsync within {self._waitaof_timeout_ms} ms"
                )
            result: list[bytes] = ids
            return result
        raise AssertionError("unreachable")
