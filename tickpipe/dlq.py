"""Dead-letter operations: list, replay (atomically back to the stream), drop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from tickpipe.redis_conn import text, xrange_pages

# Re-append a dead letter's original fields to the stream and delete it from
# the dead-letter stream in one atomic step: a replay is never lost or doubled.
REPLAY_LUA = """#!lua
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields, out = found[1][2], {}
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 6) == 'field:' then
    out[#out + 1] = string.sub(fields[i], 7)
    out[#out + 1] = fields[i + 1]
  end
end
if #out == 0 then
  return redis.error_reply('dead letter ' .. ARGV[1] .. ' holds no fields to replay')
end
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


class DeadLetters:
    def __init__(self, redis: Redis, dead_stream: str, stream: str) -> None:
        self.redis = redis
        self.dead_stream = dead_stream
        self.stream = stream
        self._replay = redis.register_script(REPLAY_LUA)

    async def oldest(self, limit: int) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters."""
        found: Any = await self.redis.xrange(self.dead_stream, count=limit)
        letters = []
        for dead_id, raw in found:
            fields = {text(k): text(v) for k, v in raw.items()}
            letters.append(
                {
                    "id": text(dead_id),
                    "original_id": fields.pop("original_id", None),
                    "stream": fields.pop("stream", None),
                    "reason": fields.pop("reason", None),
                    "deliveries": int(fields.pop("deliveries", 0)),
                    "fields": {k.removeprefix("field:"): v for k, v in fields.items()},
                }
            )
        return letters

    async def all_ids(self) -> list[str]:
        return [
            entry_id
            async for page in xrange_pages(self.redis, self.dead_stream, 1000)
            for entry_id, _ in page
        ]

    async def replay(self, ids: Sequence[str]) -> dict[str, str | None]:
        """Dead-letter id -> new stream id (None when no such dead letter)."""
        replayed: dict[str, str | None] = {}
        for dead_id in ids:
            new_id = await self._replay(keys=[self.dead_stream, self.stream], args=[dead_id])
            replayed[dead_id] = text(new_id) if new_id else None
        return replayed

    async def drop(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        dropped: int = await self.redis.xdel(self.dead_stream, *ids)
        return dropped
