"""Dead-letter operations on every shard: list, replay (atomically back to the stream), drop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tickpipe.core.dead_letter import FIELD_PREFIX
from tickpipe.core.dead_letter import decode as decode_dead_letter
from tickpipe.core.redis_conn import RedisClient, text, xrange_pages
from tickpipe.core.shards import Shard
from tickpipe.core.stream_ids import StreamId, id_key, is_id

# Re-append a dead letter's original fields to the stream and delete it from
# the dead-letter stream in one atomic step: a replay is never lost or doubled.
REPLAY_LUA = f"""#!lua
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields, out = found[1][2], {{}}
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, {len(FIELD_PREFIX)}) == '{FIELD_PREFIX}' then
    out[#out + 1] = string.sub(fields[i], {len(FIELD_PREFIX) + 1})
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


class AmbiguousDeadLetter(ValueError):
    """A bare id that names a dead letter in several shards."""

    def __init__(self, name: str, candidates: list[str]) -> None:
        super().__init__(
            f"dead letter {name} is in several shards: {', '.join(candidates)};"
            " name the one you mean"
        )
        self.candidates = candidates


class DeadLetters:
    """The dead letters of every shard.

    With one shard a dead letter is named by its id; with several, by
    ``shard/id`` (ids are unique within one dead-letter stream only). A bare id
    given with several shards is looked up in each, and refused when more than
    one holds it.
    """

    def __init__(self, redis: RedisClient, shards: Sequence[Shard]) -> None:
        self.redis = redis
        self.shards = tuple(shards)
        self._replay = redis.register_script(REPLAY_LUA)

    def _name(self, shard: Shard, dead_id: str) -> str:
        return dead_id if len(self.shards) == 1 else f"{shard.index}/{dead_id}"

    def _candidates(self, name: str) -> list[tuple[Shard, str]]:
        index, sep, dead_id = name.partition("/")
        if sep and index.isdigit() and int(index) < len(self.shards):
            return [(self.shards[int(index)], dead_id)]
        return [(shard, name) for shard in self.shards]

    async def oldest(self, limit: int) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters (by the time they were dead-lettered)."""
        letters: list[dict[str, Any]] = []
        for shard in self.shards:
            found: Any = await self.redis.xrange(shard.dead_stream, count=limit)
            for dead_id, raw in found:
                letter = decode_dead_letter({text(k): text(v) for k, v in raw.items()})
                letters.append(
                    {
                        "id": self._name(shard, text(dead_id)),
                        "shard": shard.index,
                        "original_id": letter.original_id,
                        "stream": letter.stream,
                        "reason": letter.reason,
                        "deliveries": letter.deliveries,
                        "fields": letter.fields,
                    }
                )
        letters.sort(key=lambda letter: _id_key(letter["id"].rpartition("/")[2]))
        return letters[:limit]

    async def all_ids(self) -> list[str]:
        return [
            self._name(shard, entry_id)
            for shard in self.shards
            async for page in xrange_pages(self.redis, shard.dead_stream, 1000)
            for entry_id, _ in page
        ]

    async def replay(self, names: Sequence[str]) -> dict[str, str | None]:
        """Dead letter -> new stream id (None when no such dead letter).

        Raises :class:`AmbiguousDeadLetter`, before any change, for a bare id
        held by several shards.
        """
        found = await self._resolve(names)
        replayed: dict[str, str | None] = {}
        for name in names:
            replayed[name] = None
            if (target := found[name]) is None:
                continue
            shard, dead_id = target
            # The shard's dead letters and stream share a slot: one script may touch both.
            new_id = await self._replay(keys=[shard.dead_stream, shard.stream], args=[dead_id])
            if new_id:
                replayed[name] = text(new_id)
        return replayed

    async def drop(self, names: Sequence[str]) -> int:
        """Delete dead letters; returns how many there were (see :meth:`replay` for ids)."""
        found = await self._resolve(names)
        dropped = 0
        for target in found.values():
            if target is not None:
                shard, dead_id = target
                dropped += int(await self.redis.xdel(shard.dead_stream, dead_id))
        return dropped

    async def _resolve(self, names: Sequence[str]) -> dict[str, tuple[Shard, str] | None]:
        """The one dead letter each name means (None: none); ambiguous names are refused."""
        found: dict[str, tuple[Shard, str] | None] = {}
        for name in names:
            holders = [
                (shard, dead_id)
                for shard, dead_id in self._candidates(name)
                if is_id(dead_id) and await self.redis.xrange(shard.dead_stream, dead_id, dead_id)
            ]
            if len(holders) > 1:
                raise AmbiguousDeadLetter(name, [self._name(s, i) for s, i in holders])
            found[name] = holders[0] if holders else None
        return found


def _id_key(entry_id: str) -> StreamId:
    return id_key(entry_id) if is_id(entry_id) else (0, 0)
