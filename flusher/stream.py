"""The flusher's Redis side: read through the group, acknowledge, reclaim, dead-letter, trim.

Every redis-py error that means "Redis is unavailable" leaves this module as
:class:`~flusher.errors.TransientError`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from flusher.errors import TransientError
from tickpipe import redis_conn
from tickpipe.redis_conn import text
from tickpipe.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

_UNAVAILABLE = (ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, OSError)


def _transient(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise TransientError(f"redis: {type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (a Redis restarted without persistence,
            # a FLUSHALL): create it again and retry; the audit will tell the rest.
            stream = args[0]
            assert isinstance(stream, TickStream)
            await redis_conn.ensure_group(stream.redis, stream.stream, stream.group)
            raise TransientError(f"redis: group {stream.group} was missing: recreated") from exc

    return wrapper


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry. ``fields`` is None when the entry was deleted from the stream."""

    id: str
    fields: dict[bytes, bytes] | None


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    entry: Entry
    reason: str
    deliveries: int


@dataclasses.dataclass(frozen=True, slots=True)
class GroupStats:
    pending: int
    lag: int | None


# MINID for XTRIM: the oldest id any group still needs, never newer than the
# retention floor (ARGV[1]). Computed and applied in one atomic step, so no
# entry can become pending between the measure and the trim.
# Returns {entries trimmed, minid used} or {0, ""} when nothing may be trimmed.
# allow-oom: trimming frees memory, so it must run precisely when memory is full.
TRIM_LUA = """#!lua flags=allow-oom
local stream, floor = KEYS[1], ARGV[1]
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
if redis.call('EXISTS', stream) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return {0, ''} end
local minid = floor
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if older(info['last-delivered-id'], minid) then minid = info['last-delivered-id'] end
  if info['pending'] > 0 then
    local summary = redis.call('XPENDING', stream, info['name'])
    if older(summary[2], minid) then minid = summary[2] end
  end
end
return {redis.call('XTRIM', stream, 'MINID', minid), minid}
"""

# Delete a consumer only if it still has nothing pending: XGROUP DELCONSUMER
# drops a consumer's pending entries with it, so check and delete atomically.
DELETE_IDLE_CONSUMER_LUA = """#!lua flags=allow-oom
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] == ARGV[2] then
    if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[3]) then
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    end
    return -1
  end
end
return -1
"""


# Dead-letter one entry only while it is still pending: a retry after a lost
# reply finds it acknowledged already and adds no second dead letter.
# KEYS[1] stream, KEYS[2] dead-letter stream; ARGV[1] group, ARGV[2] id, then fields.
DEAD_LETTER_LUA = """#!lua
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Count each lost id once (a retry after a lost reply must not count it again);
# the ids are kept for whoever investigates. KEYS[1] counter, KEYS[2] id set.
COUNT_LOST_LUA = """#!lua
local added = 0
for i = 1, #ARGV do added = added + redis.call('SADD', KEYS[2], ARGV[i]) end
return redis.call('INCRBY', KEYS[1], added)
"""


class TickStream:
    """The stream and consumer group, as one flusher consumer sees them."""

    def __init__(
        self,
        redis: Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        dead_stream: str,
        lost_key: str,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream
        self.lost_key = lost_key
        self._trim = redis.register_script(TRIM_LUA)
        self._delete_idle_consumer = redis.register_script(DELETE_IDLE_CONSUMER_LUA)
        self._dead_letter = redis.register_script(DEAD_LETTER_LUA)
        self._count_lost = redis.register_script(COUNT_LOST_LUA)

    @classmethod
    def for_consumer(cls, redis: Redis, settings: Settings, consumer: str) -> TickStream:
        """The stream, group, dead-letter stream and lost counter that ``settings`` name."""
        return cls(
            redis,
            settings.stream_name,
            settings.group_name,
            consumer,
            dead_stream=settings.dead_stream_name,
            lost_key=settings.lost_key,
        )

    @_transient
    async def ensure_group(self) -> None:
        await redis_conn.ensure_group(self.redis, self.stream, self.group)

    @_transient
    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to any consumer (``>``), waiting up to ``block_ms``."""
        return await self._read(">", count, block_ms)

    @_transient
    async def read_own_pending(self, after: str, count: int) -> list[Entry]:
        """This consumer's pending entries with ids greater than ``after`` (start at ``0``)."""
        return await self._read(after, count, None)

    @_transient
    async def ack(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        acked: int = await self.redis.xack(self.stream, self.group, *ids)
        return acked

    @_transient
    async def claim(
        self, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[Entry], list[str]]:
        """XAUTOCLAIM entries idle for ``min_idle_ms``: (next cursor, entries, deleted ids).

        Deleted ids are entries trimmed or XDELed while pending: Redis drops them
        from the pending list and they can never be written.
        """
        reply: Any = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_ms, start_id=cursor, count=count
        )
        next_cursor, messages, deleted = reply[0], reply[1], reply[2] if len(reply) > 2 else []
        entries = [Entry(text(i), fields or None) for i, fields in messages]
        return text(next_cursor), entries, [text(i) for i in deleted]

    @_transient
    async def deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        """How many times each pending id has been delivered (XPENDING, one call per id)."""
        counts: dict[str, int] = {}
        for entry_id in ids:
            rows = await self.redis.xpending_range(
                self.stream, self.group, min=entry_id, max=entry_id, count=1
            )
            if rows:
                counts[entry_id] = int(rows[0]["times_delivered"])
        return counts

    @_transient
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        """Move entries to the dead-letter stream and acknowledge them, each atomically.

        Returns how many were moved (an entry acknowledged meanwhile is skipped).
        """
        moved = 0
        for letter in letters:
            fields: list[bytes | str] = [
                "original_id", letter.entry.id,
                "stream", self.stream,
                "reason", letter.reason,
                "deliveries", str(letter.deliveries),
            ]  # fmt: skip
            # The original bytes, as they were: an entry may be dead for not being UTF-8.
            for key, value in (letter.entry.fields or {}).items():
                fields.extend((b"field:" + key, value))
            moved += int(
                await self._dead_letter(
                    keys=[self.stream, self.dead_stream],
                    args=[self.group, letter.entry.id, *fields],
                )
            )
        return moved

    @_transient
    async def count_lost(self, ids: Sequence[str]) -> int:
        """Add to the shared lost counter (read by `tickpipe audit`); returns the total."""
        total = await self._count_lost(keys=[self.lost_key, f"{self.lost_key}:ids"], args=list(ids))
        return int(total)

    @_transient
    async def trim(self, retention_floor_id: str) -> tuple[int, str]:
        """XTRIM MINID to the oldest id still needed; returns (entries trimmed, minid)."""
        trimmed, minid = await self._trim(keys=[self.stream], args=[retention_floor_id])
        return int(trimmed), text(minid)

    @_transient
    async def delete_idle_consumers(self, idle_ms: int) -> list[str]:
        """Delete consumers idle for ``idle_ms`` that have nothing pending; returns their names."""
        deleted = []
        for consumer in await self.redis.xinfo_consumers(self.stream, self.group):
            name = text(consumer["name"])
            if name == self.consumer or consumer["pending"] or consumer["idle"] < idle_ms:
                continue
            removed = await self._delete_idle_consumer(
                keys=[self.stream], args=[self.group, name, idle_ms]
            )
            if int(removed) >= 0:
                deleted.append(name)
        return deleted

    @_transient
    async def stats(self) -> GroupStats:
        for group in await self.redis.xinfo_groups(self.stream):
            if text(group["name"]) == self.group:
                lag = group.get("lag")
                return GroupStats(int(group["pending"]), None if lag is None else int(lag))
        return GroupStats(0, None)

    async def _read(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count, block=block_ms
        )
        entries: list[Entry] = []
        for _stream, messages in reply or []:
            for raw_id, fields in messages:
                entries.append(Entry(text(raw_id), fields or None))
        return entries
