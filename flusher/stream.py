"""The flusher's Redis side: read through the group, acknowledge, reclaim, dead-letter, trim.

:class:`TickStream` is one shard's stream as one consumer sees it;
:class:`ShardedStream` is every shard a flusher reads (STREAM_SHARDS, or the
FLUSHER_SHARDS subset), read together. Every redis-py error that means "Redis
is unavailable" leaves this module as :class:`~flusher.errors.TransientError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, NamedTuple, ParamSpec, Protocol, TypeVar

from redis.asyncio import RedisCluster
from redis.client import NEVER_DECODE
from redis.exceptions import ReadOnlyError, ResponseError

from tickpipe.core import dead_letter, redis_conn, shape
from tickpipe.core.errors import FatalError, TransientError
from tickpipe.core.redis_conn import RedisClient, text
from tickpipe.core.settings import Settings
from tickpipe.core.shards import Shard

P = ParamSpec("P")
R = TypeVar("R")

_UNAVAILABLE: tuple[type[Exception], ...] = (*redis_conn.UNAVAILABLE, ReadOnlyError, OSError)


class _HasGroup(Protocol):
    group: str

    async def recreate_group(self) -> None: ...


def _transient(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            if redis_conn.not_a_cluster(exc):
                raise FatalError(
                    "REDIS_CLUSTER=1 but Redis is not a cluster: set REDIS_CLUSTER=0 or auto"
                ) from exc
            raise TransientError(f"redis: {type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:
            if not redis_conn.closed_transport(exc):
                raise
            raise TransientError(f"redis: connection closed under the command: {exc}") from exc
        except ResponseError as exc:
            if str(exc).startswith("UNBLOCKED"):
                # A blocked read whose stream moved away (a cluster slot migrated):
                # read again, from where the stream now lives.
                raise TransientError(f"redis: {exc}") from exc
            if "WRONGTYPE" in str(exc):
                # A shard's key replaced by something else (by hand, by another
                # program): that shard is unusable until someone fixes it; the
                # others are not, so it is retried like an outage, not fatal.
                raise TransientError(f"redis: {exc}") from exc
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (a Redis restarted without persistence,
            # a FLUSHALL): create it again and retry; the audit will tell the rest.
            owner: _HasGroup = args[0]  # type: ignore[assignment]
            try:
                await owner.recreate_group()
            except _UNAVAILABLE as again:
                raise TransientError(f"redis: {type(again).__name__}: {again}") from again
            raise TransientError(f"redis: group {owner.group} was missing: recreated") from exc

    return wrapper


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry. ``fields`` is None when the entry was deleted from the stream.

    Ids are unique within one shard's stream only: ``(shard, id)`` names an entry.
    For the entries handled one by one (dead letters, lost ones); batches travel
    as :class:`Delivery`.
    """

    id: str
    fields: dict[bytes, bytes] | None
    shard: int = 0


class Part(NamedTuple):
    """Entries of one shard, in stream order, as Redis sent them.

    ``fields[i]`` is entry ``ids[i]``'s flat field/value list, or None (or empty)
    when the entry was deleted from the stream while pending.
    """

    shard: int
    ids: list[bytes]
    fields: list[list[bytes] | None]

    def entry(self, index: int) -> Entry:
        values = self.fields[index]
        fields = dict(zip(values[0::2], values[1::2], strict=False)) if values else None
        return Entry(self.ids[index].decode(), fields, self.shard)


class Delivery:
    """Entries delivered by one or more reads: per shard, ids and raw field lists.

    No object per entry: the flusher builds its rows straight from the bytes.
    Iterating gives :class:`Entry` objects, for code that takes entries one by one.
    """

    __slots__ = ("_size", "parts")

    def __init__(self, parts: Iterable[Part] = ()) -> None:
        self.parts: list[Part] = [part for part in parts if part.ids]
        self._size = sum(len(part.ids) for part in self.parts)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Entry]:
        for part in self.parts:
            for index in range(len(part.ids)):
                yield part.entry(index)

    def extend(self, other: Delivery) -> None:
        self.parts.extend(other.parts)
        self._size += other._size

    def ids_by_shard(self) -> dict[int, list[bytes]]:
        by_shard: dict[int, list[bytes]] = defaultdict(list)
        for part in self.parts:
            by_shard[part.shard].extend(part.ids)
        return by_shard

    def without(self, shard: int, ids: Collection[bytes]) -> Delivery:
        """The entries but those of ``shard`` whose id is in ``ids``."""
        if not ids:
            return self
        kept = []
        for part in self.parts:
            if part.shard != shard:
                kept.append(part)
                continue
            keep = [index for index, entry_id in enumerate(part.ids) if entry_id not in ids]
            kept.append(Part(shard, [part.ids[i] for i in keep], [part.fields[i] for i in keep]))
        return Delivery(kept)

    @property
    def last_id(self) -> str:
        """The id of the last entry (of the last part): where a read from it goes on."""
        return self.parts[-1].ids[-1].decode()


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    entry: Entry
    reason: str
    deliveries: int


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim from a consumer took (see :meth:`TickStream.claim_from`)."""

    owner_state: str
    """``alive`` (nothing taken), ``dead`` (heartbeat expired), ``never seen`` or ``own``."""
    next_start: str
    """Where the next page starts; '' when the consumer has no more to give now."""
    entries: Delivery
    deleted: list[str]
    """Ids trimmed or XDELed while pending: dropped from the pending list, never written."""


@dataclasses.dataclass(frozen=True, slots=True)
class GroupStats:
    pending: int
    lag: int | None
    oldest_pending_id: str | None = None
    """The smallest id delivered and not yet acknowledged; None when nothing is pending."""


TRIM_EXACT_MAX = 5000
"""Entries from the safe point on that a trim counts one by one (each costs Redis ~2 µs).

Past it (a backlog) the entries bound is estimated from the group's lag instead.
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Trimmed:
    """What one trim of a shard's stream did, and what it saw of Redis's memory."""

    by_age: int
    """Acknowledged entries older than the retention floor (STREAM_RETENTION_S)."""
    by_count: int
    """Acknowledged entries beyond the entries bound (STREAM_RETENTION_MAX_ENTRIES)."""
    under_pressure: int
    """Acknowledged entries trimmed because Redis memory was over the pressure threshold."""
    safe_id: str
    """Every entry older than this is acknowledged by every group; '' when there is no group."""
    count_bound: str
    """How the entries bound was applied: ``exact`` (counted), ``estimate`` (a backlog too
    long to count: from the group's lag), ``within`` (not reached), ``unknown`` (a backlog
    and no lag from Redis: not applied this time), ``off``, or ``pressure``."""
    pressure: bool
    """Redis's used_memory was at or over the pressure threshold of its maxmemory."""
    used_memory: int
    maxmemory: int
    """0: Redis has no memory limit."""

    @property
    def total(self) -> int:
        return self.by_age + self.by_count + self.under_pressure


# Trim acknowledged history in one atomic step, never an unacknowledged entry.
# The safe point: the oldest pending entry of any group, or the entry after the
# last one a group was delivered (every entry older than it is acknowledged by
# every group). Below it, and only below it, the script trims:
# - under memory pressure (INFO memory: used_memory at or over ARGV[4] percent
#   of a non-zero maxmemory), everything;
# - otherwise what is older than the retention floor ARGV[1], then the oldest
#   entries until at most ARGV[2] acknowledged ones remain (-1: no bound). Those
#   are counted exactly when at most ARGV[3] entries lie from the safe point on
#   (XTRIM MAXLEN keeps them all and ARGV[2] more); past that, a backlog, the
#   acknowledged ones are estimated from the group's lag and the cut is placed
#   by time (XTRIM MINID, still capped at the safe point).
# ARGV[5] '1': only look at memory, and trim only under pressure.
# Returns {by age, by count, under pressure, safe point, how the entries bound
# was applied, pressure 0/1, used_memory, maxmemory}.
# allow-oom: trimming frees memory, so it must run precisely when memory is full.
TRIM_LUA = """#!lua flags=allow-oom
local stream = KEYS[1]
local floor, max_entries, exact_max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local pressure_pct, pressure_only = tonumber(ARGV[4]), ARGV[5] == '1'
local function split(id)
  return string.match(id, '^(%d+)-(%d+)$')
end
-- Ids compare as digit strings (length, then digits): exact beyond 2^53.
local function below(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function older(a, b)
  local ams, aseq = split(a)
  local bms, bseq = split(b)
  if ams ~= bms then return below(ams, bms) end
  return below(aseq, bseq)
end
local function plus_one(digits)
  local i = #digits
  while i > 0 and string.byte(digits, i) == 57 do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #digits) end
  return string.sub(digits, 1, i - 1) .. string.char(string.byte(digits, i) + 1)
    .. string.rep('0', #digits - i)
end
local LAST = '18446744073709551615'
-- The smallest id after this one: MINID to it trims the id itself.
local function after(id)
  local ms, seq = split(id)
  if seq ~= LAST then return ms .. '-' .. plus_one(seq) end
  if ms ~= LAST then return plus_one(ms) .. '-0' end
  return id
end
local used, limit, pressure = 0, 0, false
if pressure_pct > 0 then
  local info = redis.call('INFO', 'memory')
  used = tonumber(string.match(info, '\\nused_memory:(%d+)')) or 0
  limit = tonumber(string.match(info, '\\nmaxmemory:(%d+)')) or 0
  pressure = limit > 0 and used * 100 >= limit * pressure_pct
end
local function result(by_age, by_count, by_pressure, safe, bound)
  return {by_age, by_count, by_pressure, safe, bound, pressure and 1 or 0, used, limit}
end
if pressure_only and not pressure then return result(0, 0, 0, '', 'off') end
if redis.call('EXISTS', stream) == 0 then return result(0, 0, 0, '', 'off') end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return result(0, 0, 0, '', 'off') end
local safe, lag, window
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local bound, held = after(info['last-delivered-id']), 0
  if info['pending'] > 0 then
    local summary = redis.call('XPENDING', stream, info['name'])
    if older(summary[2], bound) then bound, held = summary[2], info['pending'] end
  end
  if safe == nil or older(bound, safe) then safe, lag, window = bound, info['lag'], held end
end
if pressure then
  return result(0, 0, redis.call('XTRIM', stream, 'MINID', safe), safe, 'pressure')
end
local minid = floor
if older(safe, minid) then minid = safe end
local by_age = redis.call('XTRIM', stream, 'MINID', minid)
if max_entries < 0 then return result(by_age, 0, 0, safe, 'off') end
local length = redis.call('XLEN', stream)
if length <= max_entries then return result(by_age, 0, 0, safe, 'within') end
if type(lag) ~= 'number' or lag <= exact_max then
  local from_safe = #redis.call('XRANGE', stream, safe, '+', 'COUNT', exact_max + 1)
  if from_safe <= exact_max then
    local keep, by_count = from_safe + max_entries, 0
    if length > keep then by_count = redis.call('XTRIM', stream, 'MAXLEN', keep) end
    return result(by_age, by_count, 0, safe, 'exact')
  end
end
if type(lag) ~= 'number' then return result(by_age, 0, 0, safe, 'unknown') end
local acked = length - lag - window
if acked <= max_entries then return result(by_age, 0, 0, safe, 'estimate') end
local first_ms = tonumber((split(redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1])))
local safe_ms = tonumber((split(safe)))
local cut_ms = first_ms + math.floor((safe_ms - first_ms) * (acked - max_entries) / acked)
local cut = string.format('%.0f', math.max(0, cut_ms)) .. '-0'
if older(safe, cut) then cut = safe end
return result(by_age, redis.call('XTRIM', stream, 'MINID', cut), 0, safe, 'estimate')
"""

# Delete a consumer only if it still has nothing pending: XGROUP DELCONSUMER
# drops a consumer's pending entries with it, so check and delete atomically.
# Its record in the hash of consumers seen (KEYS[2]) goes with it.
DELETE_IDLE_CONSUMER_LUA = """#!lua flags=allow-oom
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] == ARGV[2] then
    if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[3]) then
      redis.call('HDEL', KEYS[2], ARGV[2])
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


# A flusher's heartbeat on one shard: its key, alive for ARGV[1] ms, and the time
# of this beat (Redis's clock, epoch ms) in the hash of consumers ever seen.
# KEYS[1] heartbeat key, KEYS[2] seen hash; ARGV[1] ttl ms, ARGV[2] consumer.
HEARTBEAT_LUA = """#!lua flags=allow-oom
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('SET', KEYS[1], ms, 'PX', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ms)
return ms
"""

# Claim, in stream order, the pending entries of one consumer that may be taken:
# all of a consumer whose heartbeat expired (it is in the seen hash, its key is
# gone), those idle for ARGV[5] ms of one that never sent a heartbeat (the
# backstop), and none of one whose key lives. The claimer's own entries are
# taken after ARGV[5] ms too (rows Postgres rejected, retried). The check and
# the claim are one step: a consumer cannot come back to life between them.
# KEYS[1] stream, KEYS[2] owner's heartbeat key, KEYS[3] seen hash.
# ARGV: group, owner, claimer, idle ms if dead, idle ms otherwise, start (exclusive
# after the first page: "(id"), count.
# Returns {state, next start ('' when done), entries, deleted ids}: entries as
# XREADGROUP gives them; deleted ids were trimmed or XDELed while pending and are
# dropped from the pending list by XCLAIM (Redis >= 7.0 leaves them out of its
# reply; older versions answer nil). allow-oom: a dead flusher's entries must be
# taken over when Redis memory is full too (claiming adds no data).
CLAIM_FROM_LUA = """#!lua flags=allow-oom
local group, owner, claimer = ARGV[1], ARGV[2], ARGV[3]
local state, min_idle = 'own', ARGV[5]
if owner ~= claimer then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'alive', '', {}, {}} end
  if redis.call('HEXISTS', KEYS[3], owner) == 1 then
    state, min_idle = 'dead', ARGV[4]
  else
    state = 'never seen'
  end
end
local count = tonumber(ARGV[7])
local rows = redis.call('XPENDING', KEYS[1], group, 'IDLE', min_idle, ARGV[6], '+', count, owner)
if #rows == 0 then return {state, '', {}, {}} end
local ids = {}
for i, row in ipairs(rows) do ids[i] = row[1] end
local claimed = redis.call('XCLAIM', KEYS[1], group, claimer, min_idle, unpack(ids))
local entries, got = {}, {}
for _, entry in ipairs(claimed) do
  if type(entry) == 'table' then
    entries[#entries + 1] = entry
    got[entry[1]] = true
  end
end
local deleted = {}
for _, id in ipairs(ids) do
  -- Neither claimed nor idle enough cannot happen here: the XPENDING above chose
  -- them in this same step. What XCLAIM left out is gone from the stream.
  if not got[id] then deleted[#deleted + 1] = id end
end
local next_start = ''
if #rows == count then next_start = '(' .. ids[#ids] end
return {state, next_start, entries, deleted}
"""

_RAW_REPLY = "tickpipe_raw_reply"
"""An option of the XREADGROUPs sent here: the reply is returned as Redis sent it."""


def _read_raw_replies(redis: RedisClient) -> None:
    """Let this module's XREADGROUPs skip redis-py's parsing (a dict per entry).

    Any other XREADGROUP sent through the client is parsed as before. Idempotent.
    """
    parse = redis.response_callbacks.get("XREADGROUP")
    if getattr(parse, _RAW_REPLY, False):
        return

    def callback(response: Any, **options: Any) -> Any:
        if options.pop(_RAW_REPLY, False) or parse is None:
            return response
        return parse(response, **options)

    setattr(callback, _RAW_REPLY, True)
    redis.set_response_callback("XREADGROUP", callback)


async def _xreadgroup(
    redis: RedisClient,
    group: str,
    consumer: str,
    starts: Mapping[str, str],
    count: int,
    block_ms: int | None,
) -> Any:
    """XREADGROUP's reply as Redis sent it: no object per entry, bytes whatever the client."""
    args: list[str | int] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    args += ["STREAMS", *starts, *starts.values()]
    return await redis.execute_command(*args, **{_RAW_REPLY: True, NEVER_DECODE: True})


def _parts(reply: Any, shard_of: Callable[[bytes], int]) -> list[Part]:
    """The entries of a raw XREADGROUP/XAUTOCLAIM reply, one part per stream."""
    if not reply:
        return []
    parts = []
    for name, messages in reply.items() if isinstance(reply, dict) else reply:
        if messages:
            parts.append(Part(shard_of(name), [m[0] for m in messages], [m[1] for m in messages]))
    return parts


class TickStream:
    """One shard's stream and the consumer group, as one flusher consumer sees them.

    Every call names keys of that shard only: one cluster slot.
    """

    def __init__(self, redis: RedisClient, keys: Shard, group: str, consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        """The shard's stream, dead-letter stream and lost counter (tickpipe/core/shards.py)."""
        self.stream = keys.stream
        self.dead_stream = keys.dead_stream
        self.shard = keys.index
        self.group = group
        self.consumer = consumer
        self.reads = 0
        """XREADGROUP commands sent."""
        _read_raw_replies(redis)
        self._trim = redis.register_script(TRIM_LUA)
        self._delete_idle_consumer = redis.register_script(DELETE_IDLE_CONSUMER_LUA)
        self._dead_letter = redis.register_script(DEAD_LETTER_LUA)
        self._count_lost = redis.register_script(COUNT_LOST_LUA)
        self._heartbeat = redis.register_script(HEARTBEAT_LUA)
        self._claim_from = redis.register_script(CLAIM_FROM_LUA)
        self.heartbeat_key = keys.heartbeat(group, consumer)
        """This consumer's heartbeat key on this shard (alive while it exists)."""
        self.heartbeats_seen_key = keys.heartbeats_seen(group)

    @_transient
    async def ensure_group(self) -> None:
        await redis_conn.ensure_group(self.redis, self.stream, self.group)

    async def recreate_group(self) -> None:
        await redis_conn.ensure_group(self.redis, self.stream, self.group)

    @_transient
    async def read_new(self, count: int, block_ms: int | None) -> Delivery:
        """Entries never delivered to any consumer (``>``), waiting up to ``block_ms``."""
        return await self._read(">", count, block_ms)

    @_transient
    async def read_own_pending(self, after: str, count: int) -> Delivery:
        """This consumer's pending entries with ids greater than ``after`` (start at ``0``)."""
        return await self._read(after, count, None)

    @_transient
    async def ack(self, ids: Sequence[bytes | str]) -> int:
        if not ids:
            return 0
        acked: int = await self.redis.xack(self.stream, self.group, *ids)
        return acked

    @_transient
    async def beat(self, ttl_ms: int) -> None:
        """Say this consumer is alive for ``ttl_ms`` more (its heartbeat key, refreshed)."""
        await self._heartbeat(
            keys=[self.heartbeat_key, self.heartbeats_seen_key], args=[ttl_ms, self.consumer]
        )

    @_transient
    async def fall_silent(self) -> None:
        """Drop this consumer's heartbeat key (at stop): what it left pending is claimed at once."""
        await self.redis.delete(self.heartbeat_key)

    @_transient
    async def holders(self) -> dict[str, int]:
        """The consumers of the group holding pending entries, with how many."""
        summary: Any = await self.redis.xpending(self.stream, self.group)
        return {
            text(consumer["name"]): int(consumer["pending"])
            for consumer in summary.get("consumers") or []
        }

    @_transient
    async def claim_from(
        self, owner: str, start: str, count: int, *, dead_idle_ms: int, idle_ms: int
    ) -> Claimed:
        """Claim up to ``count`` pending entries of ``owner`` from ``start`` on, in order.

        All of them when ``owner``'s heartbeat expired (idle for ``dead_idle_ms``);
        none while it lives; those idle for ``idle_ms`` when it never sent one, and
        of this consumer itself (see CLAIM_FROM_LUA).
        """
        state, next_start, messages, deleted = await self._claim_from(
            keys=[self.stream, self.keys.heartbeat(self.group, owner),
                  self.heartbeats_seen_key],
            args=[self.group, owner, self.consumer, dead_idle_ms, idle_ms, start, count],
        )  # fmt: skip
        entries = Delivery([Part(self.shard, [m[0] for m in messages], [m[1] for m in messages])])
        return Claimed(text(state), text(next_start), entries, [text(i) for i in deleted])

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
    async def own_pending(self) -> int:
        """How many entries wait in this consumer's pending list."""
        summary: Any = await self.redis.xpending(self.stream, self.group)
        for consumer in summary.get("consumers") or []:
            if text(consumer["name"]) == self.consumer:
                return int(consumer["pending"])
        return 0

    @_transient
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        """Move entries to the dead-letter stream and acknowledge them, each atomically.

        Returns how many were moved (an entry acknowledged meanwhile is skipped).
        """
        moved = 0
        for letter in letters:
            # The original bytes, as they were: an entry may be dead for not being UTF-8.
            fields = dead_letter.encode(
                letter.entry.id,
                self.stream,
                letter.reason,
                letter.deliveries,
                letter.entry.fields or {},
            )
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
        total = await self._count_lost(keys=[self.keys.lost, self.keys.lost_ids], args=list(ids))
        return int(total)

    @_transient
    async def trim(
        self,
        retention_floor_id: str,
        max_entries: int | None = None,
        *,
        pressure_pct: float = 0.0,
        pressure_only: bool = False,
        exact_max: int = TRIM_EXACT_MAX,
    ) -> Trimmed:
        """Trim acknowledged history, atomically, never an unacknowledged entry.

        Keeps what is newer than ``retention_floor_id`` (an id) but at most
        ``max_entries`` acknowledged entries (None: no bound); all of it goes when
        Redis's used_memory is at or over ``pressure_pct`` percent of its
        maxmemory (0: never). With ``pressure_only`` nothing is trimmed unless
        under pressure.
        """
        reply: Any = await self._trim(
            keys=[self.stream],
            args=[
                retention_floor_id,
                -1 if max_entries is None else max_entries,
                exact_max,
                repr(float(pressure_pct)),
                int(pressure_only),
            ],
        )
        by_age, by_count, by_pressure, safe, bound, pressure, used, limit = reply
        return Trimmed(
            by_age=int(by_age),
            by_count=int(by_count),
            under_pressure=int(by_pressure),
            safe_id=text(safe),
            count_bound=text(bound),
            pressure=bool(int(pressure)),
            used_memory=int(used),
            maxmemory=int(limit),
        )

    @_transient
    async def delete_idle_consumers(self, idle_ms: int) -> list[str]:
        """Delete consumers idle for ``idle_ms`` that have nothing pending; returns their names."""
        deleted = []
        for consumer in await self.redis.xinfo_consumers(self.stream, self.group):
            name = text(consumer["name"])
            if name == self.consumer or consumer["pending"] or consumer["idle"] < idle_ms:
                continue
            removed = await self._delete_idle_consumer(
                keys=[self.stream, self.heartbeats_seen_key], args=[self.group, name, idle_ms]
            )
            if int(removed) >= 0:
                deleted.append(name)
        return deleted

    @_transient
    async def stats(self) -> GroupStats:
        for group in await self.redis.xinfo_groups(self.stream):
            if text(group["name"]) == self.group:
                lag, pending = group.get("lag"), int(group["pending"])
                oldest = None
                if pending:
                    summary: Any = await self.redis.xpending(self.stream, self.group)
                    oldest = text(summary["min"]) if summary.get("min") else None
                return GroupStats(pending, None if lag is None else int(lag), oldest)
        return GroupStats(0, None)

    async def _read(self, start: str, count: int, block_ms: int | None) -> Delivery:
        self.reads += 1
        reply = await _xreadgroup(
            self.redis, self.group, self.consumer, {self.stream: start}, count, block_ms
        )
        return Delivery(_parts(reply, self._own_shard))

    def _own_shard(self, _name: bytes) -> int:
        return self.shard


class ShardedStream:
    """Every shard one flusher reads, as one consumer of the group.

    A single Redis serves all of them: new entries come from one XREADGROUP over
    every shard's stream. In a Redis Cluster a command may only name keys of
    one slot, and each shard has its own: there, one XREADGROUP per shard, run
    concurrently, and a read still waiting when another returned is kept for
    the next call rather than cancelled (a cancelled read may have delivered
    entries whose reply is lost). Reads and acknowledgements report each
    shard's failure on its own, so that the caller can go on with the others.
    Everything else (reclaim, dead letters, trimming, consumer housekeeping)
    goes shard by shard through :class:`TickStream`.
    """

    def __init__(self, redis: RedisClient, streams: Sequence[TickStream]) -> None:
        if not streams:
            raise ValueError("a flusher needs at least one shard to read")
        self.redis = redis
        self.shards = tuple(streams)
        self.group = streams[0].group
        self.consumer = streams[0].consumer
        self._by_index = {stream.shard: stream for stream in streams}
        self._shard_by_name = {stream.stream.encode(): stream.shard for stream in streams}
        self._per_shard_reads = isinstance(redis, RedisCluster) and len(streams) > 1
        self._reads: dict[int, asyncio.Task[Delivery]] = {}
        self._reads_together = 0

    @property
    def reads(self) -> int:
        """XREADGROUP commands sent, for every shard."""
        return self._reads_together + sum(stream.reads for stream in self.shards)

    @classmethod
    def for_consumer(cls, redis: RedisClient, settings: Settings, consumer: str) -> ShardedStream:
        """The shards ``settings`` give this flusher (FLUSHER_SHARDS, else all)."""
        return cls(
            redis,
            [
                TickStream(redis, shard, settings.group_name, consumer)
                for shard in settings.flusher_shard_set
            ],
        )

    @property
    def names(self) -> list[str]:
        return [stream.stream for stream in self.shards]

    async def fall_silent(self) -> None:
        """Drop this consumer's heartbeat on every shard that answers (at stop)."""
        for stream in self.shards:
            with contextlib.suppress(TransientError):
                await stream.fall_silent()

    @_transient
    async def claim_shape(self, settings: Settings) -> None:
        """Record the deployment's shape (STREAM_SHARDS), or refuse to run with another."""
        try:
            await shape.claim(self.redis, settings)
        except shape.ShapeMismatch as exc:
            raise FatalError(str(exc)) from None

    @property
    def shards_by_index(self) -> dict[int, TickStream]:
        return self._by_index

    async def recreate_group(self) -> None:
        for stream in self.shards:
            # A shard that cannot have it now shows on its own next command.
            with contextlib.suppress(*_UNAVAILABLE, ResponseError):
                await stream.recreate_group()

    async def read_new(
        self, count: int, block_ms: int | None, shards: Collection[int] | None = None
    ) -> tuple[Delivery, dict[int, TransientError]]:
        """Entries never delivered (``>``) of ``shards`` (default all), waiting up to ``block_ms``.

        About ``count`` in all: each shard is asked for its share (``count`` over
        the shards read, at least 1), so one batch never holds ``count`` entries
        of every shard. Returns the entries, and the failure of each shard that
        failed: the others' entries are delivered all the same.
        """
        chosen = self.shards if shards is None else [s for s in self.shards if s.shard in shards]
        if not chosen:
            return Delivery(), {}
        share = max(1, -(-count // len(chosen)))
        if self._per_shard_reads:
            return await self._read_each(chosen, share, block_ms)
        if len(chosen) == 1:
            try:
                return await chosen[0].read_new(share, block_ms), {}
            except TransientError as exc:
                return Delivery(), {chosen[0].shard: exc}
        try:
            return await self._read_together(chosen, share, block_ms), {}
        except TransientError:
            pass
        # Which shard failed? Each on its own, without waiting.
        entries = Delivery()
        failures: dict[int, TransientError] = {}
        for stream in chosen:
            try:
                entries.extend(await stream.read_new(share, None))
            except TransientError as exc:
                failures[stream.shard] = exc
        return entries, failures

    @_transient
    async def _read_together(
        self, chosen: Sequence[TickStream], share: int, block_ms: int | None
    ) -> Delivery:
        # COUNT applies per stream: each shard's share.
        self._reads_together += 1
        reply = await _xreadgroup(
            self.redis,
            self.group,
            self.consumer,
            {stream.stream: ">" for stream in chosen},
            share,
            block_ms,
        )
        return Delivery(_parts(reply, self._shard_by_name.__getitem__))

    async def _read_each(
        self, chosen: Sequence[TickStream], share: int, block_ms: int | None
    ) -> tuple[Delivery, dict[int, TransientError]]:
        deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
        while True:
            remaining_ms = None
            if deadline is not None:
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            started = []
            for stream in chosen:
                if stream.shard not in self._reads:
                    started.append(asyncio.create_task(stream.read_new(share, remaining_ms)))
                    self._reads[stream.shard] = started[-1]
            if deadline is None:
                # Without waiting: the reads just sent, not one still blocked since an
                # earlier call (it is collected once it returns).
                if started:
                    await asyncio.wait(started)
                done = {task for task in self._reads.values() if task.done()}
            else:
                pending = set(self._reads.values())
                done, _ = await asyncio.wait(
                    pending,
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            entries, failures = self._collect(done)
            if entries or failures or deadline is None or time.monotonic() >= deadline:
                return entries, failures

    def _collect(
        self, done: Collection[asyncio.Task[Delivery]]
    ) -> tuple[Delivery, dict[int, TransientError]]:
        """The entries of finished reads, and the failure of each shard whose read failed."""
        entries = Delivery()
        failures: dict[int, TransientError] = {}
        unexpected: BaseException | None = None
        for shard, task in list(self._reads.items()):
            if task not in done:
                continue
            del self._reads[shard]
            error = task.exception()
            if isinstance(error, TransientError):
                failures[shard] = error
            elif error is not None:
                unexpected = unexpected or error
            else:
                entries.extend(task.result())
        if unexpected is not None:
            raise unexpected
        return entries, failures

    async def settle(self) -> Delivery:
        """Wait for the reads still under way (at stop) and return what they delivered.

        A read that failed may still have delivered entries: they wait in this
        consumer's pending list.
        """
        if not self._reads:
            return Delivery()
        done, _ = await asyncio.wait(set(self._reads.values()))
        entries, _failures = self._collect(done)
        return entries

    def abandon(self) -> None:
        """Cancel the reads still under way; what they delivered stays pending."""
        for task in self._reads.values():
            task.cancel()
        self._reads.clear()

    async def ack(
        self, by_shard: Mapping[int, Sequence[bytes | str]]
    ) -> tuple[dict[int, int], dict[int, TransientError]]:
        """XACK the ids of each shard on its shard's stream; one round trip per node.

        Returns, per shard, how many ids XACK found pending (fewer than sent: others
        were acknowledged already, by a peer that took them over), and the failure
        of each shard whose XACK failed: the other shards' entries are
        acknowledged all the same (XACK may be sent again safely).
        """
        by_shard = {shard: ids for shard, ids in by_shard.items() if ids}
        todo = dict(by_shard)
        acked: dict[int, int] = {}
        if len(by_shard) > 1:
            try:
                replies = await self._ack_pipelined(by_shard)
            except TransientError:
                pass  # each shard on its own, below
            else:
                todo = {}
                for (shard, ids), reply in zip(by_shard.items(), replies, strict=True):
                    if isinstance(reply, Exception):
                        todo[shard] = ids
                    else:
                        acked[shard] = int(reply)
        failures: dict[int, TransientError] = {}
        for shard, ids in todo.items():
            try:
                acked[shard] = await self._by_index[shard].ack(ids)
            except TransientError as exc:
                failures[shard] = exc
        return acked, failures

    @_transient
    async def _ack_pipelined(self, by_shard: Mapping[int, Sequence[bytes | str]]) -> list[Any]:
        pipe: Any = (
            self.redis.pipeline()
            if isinstance(self.redis, RedisCluster)
            else self.redis.pipeline(transaction=False)
        )
        for shard, ids in by_shard.items():
            pipe.xack(self._by_index[shard].stream, self.group, *ids)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
