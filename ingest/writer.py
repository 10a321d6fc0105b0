"""Appending ticks to the stream: group commit, one atomic Lua step per shard of a group.

How and why: docs/architecture.md, "Group commit (ingest/writer.py)".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import (
    AskError,
    ConnectionError,
    MovedError,
    NoScriptError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from ingest import metrics
from ingest.durability import FsyncBy
from ingest.errors import WriteFailed
from tickpipe.core import redis_conn
from tickpipe.core.keys import ENTRY_FIELDS
from tickpipe.core.latest_price import LATEST_FIELDS
from tickpipe.core.redis_conn import RedisClient
from tickpipe.core.settings import Durability, Settings
from tickpipe.core.shards import ShardMap
from tickpipe.core.ticks import Tick, entry_values

# The "#!lua" shebang (Redis 7 script flags, here none) makes Redis refuse the
# script whole when it cannot write (OOM, read-only replica) instead of failing
# at some XADD midway: a group's ticks are appended all together or not at all.
# KEYS[1] the stream, KEYS[2] the latest-price hash (one shard: one cluster slot).
# ARGV: the ENTRY_FIELDS of each tick, in order (symbol ts price volume source).
# Each tick becomes one entry; the hash keeps, per symbol, the tick with the
# greatest ts (a tick with an equal ts replaces it, as it replaces the row).
# The group's newest tick per symbol is found first, so the hash costs one HMGET
# and one HSET per 1000 symbols of a group, not two calls per tick.
# ts are non-negative integers without leading zeros, compared as strings by
# length then lexically: exact where Lua's doubles are not (above 2^53).
# The entry's field names and the latest-price JSON come from core (keys.ENTRY_FIELDS,
# latest_price.LATEST_FIELDS): the script is built from them below.


def _arg(name: str, base: str = "i") -> str:
    """The Lua expression of field ``name`` of the tick whose first ARGV index is ``base``."""
    offset = ENTRY_FIELDS.index(name)
    return f"ARGV[{base} + {offset}]" if offset else f"ARGV[{base}]"


def _latest_json_lua() -> str:
    """The Lua expression that writes a latest-price value (core/latest_price.py)."""
    values = {
        "ts": "ts",
        "price": _arg("price"),
        "volume": _arg("volume"),
        "source": _arg("source"),
        "id": "best_id[symbol]",
    }
    parts, literal = [], "{"
    for n, name in enumerate(LATEST_FIELDS):
        literal += ("," if n else "") + f'"{name}":'
        if name == "source":  # free text: escaped by cjson
            parts += [f"'{literal}'", f"quote({values[name]})"]
            literal = ""
        else:  # digits, decimals and stream ids need no escaping
            parts += [f"'{literal}\"'", values[name]]
            literal = '"'
    parts.append(f"'{literal}}}'")
    return " .. ".join(parts)


assert LATEST_FIELDS[0] == "ts", "the script reads ts from the start of the text"

APPEND_LUA = f"""#!lua
local stream, latest = KEYS[1], KEYS[2]
local function newer(ts, than)
  return #ts > #than or (#ts == #than and ts >= than)
end
-- The hash's JSON is read for its ts alone and written by concatenation: both
-- cost half of cjson.decode and cjson.encode of the whole object.
local function ts_of(json)
  return string.match(json, '^{{"ts":"(%d+)"') or cjson.decode(json).ts
end
local quoted = {{}}
local function quote(text)
  local q = quoted[text]
  if q == nil then
    q = cjson.encode(text)
    quoted[text] = q
  end
  return q
end
local ids, best, best_id, symbols = {{}}, {{}}, {{}}, {{}}
for i = 1, #ARGV, {len(ENTRY_FIELDS)} do
  local symbol, ts = {_arg("symbol")}, {_arg("ts")}
  local id = redis.call('XADD', stream, '*',
    {", ".join(f"'{name}', {_arg(name)}" for name in ENTRY_FIELDS)})
  ids[#ids + 1] = id
  local b = best[symbol]
  if b == nil then
    symbols[#symbols + 1] = symbol
  end
  if b == nil or newer(ts, {_arg("ts", "b")}) then
    best[symbol], best_id[symbol] = i, id
  end
end
for first = 1, #symbols, 1000 do
  local chunk = {{unpack(symbols, first, math.min(first + 999, #symbols))}}
  local current = redis.call('HMGET', latest, unpack(chunk))
  local updates = {{}}
  for j, symbol in ipairs(chunk) do
    local i = best[symbol]
    local ts = {_arg("ts")}
    if not current[j] or newer(ts, ts_of(current[j])) then
      updates[#updates + 1] = symbol
      updates[#updates + 1] = {_latest_json_lua()}
    end
  end
  if #updates > 0 then
    redis.call('HSET', latest, unpack(updates))
  end
end
return ids
"""

CLUSTER_ATTEMPTS = 8
"""Rounds a cluster write may take to follow MOVED/ASK/TRYAGAIN before giving up (503)."""


class NotDurable(WriteFailed):
    """WAITAOF or WAIT did not confirm the write in time (INGEST_DURABILITY=fsync/replica)."""

    code = "not_durable"

    @property
    def detail(self) -> str:
        return f"{self}; the ticks may or may not be stored: resend them (resending is idempotent)"


class OutcomeUnknown(WriteFailed):
    """The connection broke with the write under way: some or all shards may have stored."""

    @property
    def detail(self) -> str:
        return (
            f"the connection to the tick store (Redis) broke during the write ({self}); some"
            " of the ticks may be stored: resend the whole request (resending is idempotent)"
        )


class PartialWrite(WriteFailed):
    """Some shards of a request were appended and others were not."""

    code = "partially_stored"

    def __init__(self, stored: Sequence[int], failed: Sequence[int], cause: Exception) -> None:
        super().__init__(
            f"shards {', '.join(map(str, stored))} stored their ticks, shards"
            f" {', '.join(map(str, failed))} did not ({cause})"
        )
        self.cause = cause

    @property
    def detail(self) -> str:
        return f"{self}; resend the whole request (resending is idempotent)"


@dataclasses.dataclass
class _Waiting:
    """A request's ticks, waiting for the next group."""

    ticks: Sequence[Tick]
    size: int
    token: str
    done: asyncio.Future[list[str]]


@dataclasses.dataclass
class _Group:
    """The ticks of one request that belong to one shard."""

    shard: int
    keys: tuple[str, str]
    positions: list[int]
    argv: list[str]
    ids: list[str] | None = None
    error: Exception | None = None


class TickWriter:
    """Appends validated ticks to their shard's stream and latest-price hash.

    Durability (``INGEST_DURABILITY``): ``everysec`` answers once Redis has the
    entries; ``fsync`` waits for WAITAOF to report the local AOF fsync; ``replica``
    waits for WAIT to report that ``wait_replicas`` replicas have them, so that a
    master killed right after the answer loses nothing its promoted replica
    does not hold. WAITAOF and WAIT cover the writes of their own connection,
    so each travels in the pipeline of the node that ran the scripts.
    """

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        latest_key: str,
        *,
        shards: int = 1,
        durability: Durability = "everysec",
        fsync_by: FsyncBy = "waitaof",
        wait_timeout_ms: int = 1000,
        wait_replicas: int = 1,
        linger_ms: float = 0.0,
        group_max_ticks: int = 10_000,
        group_max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._redis = redis
        self._map = ShardMap.build(
            shards, stream=stream, latest=latest_key, tagged=isinstance(redis, RedisCluster)
        )
        self._script = redis.register_script(APPEND_LUA)
        self._slot_maps = 0
        """Slot maps this writer had the cluster client read (see _refresh_slots)."""
        self._slots_stale = False
        self._refreshing = asyncio.Lock()
        self._durability = durability
        self._fsync_by = fsync_by
        self._wait_timeout_ms = wait_timeout_ms
        self._wait_replicas = wait_replicas
        self.not_durable: str | None = None
        """Why the durability asked for cannot be had now: every write is refused."""
        self._linger_s = linger_ms / 1000
        self._group_max_ticks = group_max_ticks
        self._group_max_bytes = group_max_bytes
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._committer: asyncio.Task[None] | None = None
        self.groups = 0
        """Groups written (one round trip each): requests per group = requests / groups."""

    @classmethod
    def from_settings(
        cls, redis: RedisClient, settings: Settings, *, fsync_by: FsyncBy = "waitaof"
    ) -> TickWriter:
        timeout_ms = (
            settings.ingest_waitaof_timeout_ms
            if settings.ingest_durability == "fsync"
            else settings.ingest_wait_timeout_ms
        )
        return cls(
            redis,
            settings.stream_name,
            settings.latest_key,
            shards=settings.stream_shards,
            durability=settings.ingest_durability,
            fsync_by=fsync_by,
            wait_timeout_ms=timeout_ms,
            wait_replicas=settings.ingest_wait_replicas,
            linger_ms=settings.ingest_linger_ms,
            group_max_ticks=settings.ingest_group_max_ticks,
            group_max_bytes=settings.ingest_group_max_bytes,
        )

    async def append(self, ticks: Sequence[Tick], *, size: int = 0, token: str = "-") -> list[str]:
        """Append every tick with the next group; returns their ids in the order of ``ticks``.

        ``size`` (the request's body length) bounds a group's bytes; ``token``
        names the feeder in the accepted-ticks metric. Raises the
        Redis error when nothing was stored, :class:`PartialWrite` when some
        shards of the group were, :class:`OutcomeUnknown` when the connection
        broke during a write of several shards (any of them may have stored),
        :class:`NotDurable` when the durability wait fell short or cannot be had.
        """
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(ticks, size, token, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop(), name="group-commit")
        return await done

    async def close(self) -> None:
        """Stop the writer; requests still waiting are refused (Redis-unavailable)."""
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None

    async def _commit_loop(self) -> None:
        """Write groups while requests wait; then end (the next request starts it again).

        Between the ``while`` test and the return nothing awaits, so a request
        appended meanwhile is either seen here or finds the task done.
        """
        try:
            while self._waiting:
                if self._linger_s:
                    await asyncio.sleep(self._linger_s)
                await self._commit(self._take_group())
        finally:
            stopping = ConnectionError("ingest is stopping; nothing was stored, retry")
            while self._waiting:
                waiting = self._waiting.popleft()
                if not waiting.done.done():
                    waiting.done.set_exception(stopping)

    def _take_group(self) -> list[_Waiting]:
        """The requests waiting, oldest first, up to the group's bounds (at least one)."""
        group = [self._waiting.popleft()]
        ticks, size = len(group[0].ticks), group[0].size
        while self._waiting:
            nxt = self._waiting[0]
            ticks += len(nxt.ticks)
            size += nxt.size
            if ticks > self._group_max_ticks or size > self._group_max_bytes:
                break
            group.append(self._waiting.popleft())
        return group

    async def _commit(self, group: list[_Waiting]) -> None:
        """One round trip for the group; each request gets its ids, or the group's error."""
        ticks = group[0].ticks if len(group) == 1 else [t for w in group for t in w.ticks]
        try:
            ids = await self._append_now(ticks)
        except Exception as exc:  # every request of the group answers with it
            for waiting in group:
                if not waiting.done.done():
                    waiting.done.set_exception(exc)
            return
        self.groups += 1
        metrics.GROUP_REQUESTS.observe(len(group))
        metrics.count_accepted((w.token, len(w.ticks)) for w in group)
        start = 0
        for waiting in group:
            end = start + len(waiting.ticks)
            if not waiting.done.done():
                waiting.done.set_result(ids[start:end])
            start = end

    async def _append_now(self, ticks: Sequence[Tick]) -> list[str]:
        try:
            return await self._append(ticks)
        except RuntimeError as exc:
            if not redis_conn.closed_transport(exc):
                raise
            raise ConnectionError(f"connection closed under the write: {exc}") from exc

    async def _append(self, ticks: Sequence[Tick]) -> list[str]:
        # Checked when the group is written: the durability may be lost while it waits.
        if self.not_durable is not None:
            raise NotDurable(self.not_durable)
        groups = self._group(ticks)
        if self._wait_command() is None and len(groups) == 1 and not self._is_cluster:
            # The common case, as before sharding: one script call.
            [group] = groups
            raw = await self._script(keys=list(group.keys), args=group.argv)
            return [_text(i) for i in raw]
        try:
            if isinstance(self._redis, RedisCluster):
                await self._append_cluster(self._redis, groups)
            else:
                await self._append_single(self._redis, groups)
        except (ConnectionError, TimeoutError) as exc:
            if len(groups) == 1:
                raise
            # Sent, maybe run in part: a cluster's other nodes, or replies lost.
            raise OutcomeUnknown(f"{type(exc).__name__}: {exc}") from exc
        failed = [g for g in groups if g.ids is None]
        if failed:
            stored = [g.shard for g in groups if g.ids is not None]
            cause = failed[0].error or RuntimeError("not stored")
            if not stored:
                raise cause
            raise PartialWrite(stored, [g.shard for g in failed], cause)
        ids: list[str] = [""] * len(ticks)
        for group in groups:
            assert group.ids is not None
            for position, entry_id in zip(group.positions, group.ids, strict=True):
                ids[position] = entry_id
        return ids

    @property
    def fsync_by(self) -> FsyncBy | None:
        """How an fsync is confirmed (INGEST_DURABILITY=fsync); None in the other modes."""
        return self._fsync_by if self._durability == "fsync" else None

    @property
    def _is_cluster(self) -> bool:
        return isinstance(self._redis, RedisCluster)

    def _group(self, ticks: Sequence[Tick]) -> list[_Group]:
        if len(self._map.shards) == 1:
            [shard] = self._map.shards
            argv = [value for tick in ticks for value in entry_values(tick)]
            return [_Group(0, (shard.stream, shard.latest), list(range(len(ticks))), argv)]
        groups: dict[int, _Group] = {}
        for position, tick in enumerate(ticks):
            shard = self._map.for_symbol(tick.symbol)
            group = groups.get(shard.index)
            if group is None:
                group = groups[shard.index] = _Group(
                    shard.index, (shard.stream, shard.latest), [], []
                )
            group.positions.append(position)
            group.argv.extend(entry_values(tick))
        return list(groups.values())

    def _wait_command(self) -> tuple[Any, ...] | None:
        """WAITAOF or WAIT after the scripts; None when the reply itself is the proof
        (``everysec``, or ``fsync`` on a server with ``appendfsync always``)."""
        if self._durability == "fsync" and self._fsync_by == "waitaof":
            return ("WAITAOF", 1, 0, self._wait_timeout_ms)
        if self._durability == "replica":
            return ("WAIT", self._wait_replicas, self._wait_timeout_ms)
        return None

    def _check_wait(self, reply: Any) -> None:
        if isinstance(reply, ResponseError):
            # WAITAOF with the AOF turned off, WAIT refused: nothing confirms the write.
            raise NotDurable(f"Redis refused to confirm the write: {reply}")
        if isinstance(reply, Exception):
            raise reply
        if self._durability == "fsync":
            local, _replicas = reply
            if int(local) < 1:
                raise NotDurable(
                    f"Redis did not confirm the AOF fsync within {self._wait_timeout_ms} ms"
                )
        elif int(reply) < self._wait_replicas:
            raise NotDurable(
                f"{int(reply)} of {self._wait_replicas} replicas confirmed the write within"
                f" {self._wait_timeout_ms} ms"
            )

    async def _append_single(self, redis: Redis, groups: list[_Group]) -> None:
        """One pipeline on one connection: every shard's script, then the durability wait."""
        wait = self._wait_command()
        todo = groups
        for attempt in (1, 2):
            async with redis.pipeline(transaction=False) as pipe:
                for group in todo:
                    pipe.evalsha(self._script.sha, 2, *group.keys, *group.argv)
                if wait is not None:
                    pipe.execute_command(*wait)
                replies = await pipe.execute(raise_on_error=False)
            missing = self._take(todo, replies[: len(todo)], last=attempt == 2)
            if wait is not None:
                self._check_wait(replies[-1])
            if not missing:
                return
            # The script did not run (a restarted Redis): load it and run those once more.
            await redis.script_load(APPEND_LUA)
            todo = missing

    async def _append_cluster(self, redis: RedisCluster, groups: list[_Group]) -> None:
        """Per node, one pipeline on one connection: its shards' scripts, then its wait.

        Each command is sent to the node that owns the shard's slot; a MOVED,
        ASK or TRYAGAIN reply means the script did not run there, so it is sent
        again where the cluster says, for a few rounds. The slot map is read
        again at most once per round after a MOVED, and before the next write
        after this writer's own pipeline lost its connection (a node gone).
        """
        # The client reads its slot map on first use, and again after one of its
        # own commands (not this pipeline, which it leaves alone) lost a node.
        await redis.initialize()
        if self._slots_stale:
            await self._refresh_slots(redis, self._slot_maps)
        wait = self._wait_command()
        targets: dict[int, tuple[ClusterNode, bool]] = {}  # shard -> (node, send ASKING)
        todo = groups
        for _attempt in range(CLUSTER_ATTEMPTS):
            by_node: dict[str, list[_Group]] = {}
            nodes: dict[str, ClusterNode] = {}
            for group in todo:
                node, _asking = targets.get(group.shard) or (
                    _primary(redis, group.keys[0]),
                    False,
                )
                nodes[node.name] = node
                by_node.setdefault(node.name, []).append(group)
            pipe = redis.pipeline()
            layout: list[tuple[str, _Group | None]] = []
            for name, node_groups in by_node.items():
                for group in node_groups:
                    if targets.get(group.shard, (None, False))[1]:
                        pipe.execute_command("ASKING", target_nodes=nodes[name])
                        layout.append(("asking", None))
                    pipe.execute_command(
                        "EVALSHA",
                        self._script.sha,
                        2,
                        *group.keys,
                        *group.argv,
                        target_nodes=nodes[name],
                    )
                    layout.append(("script", group))
                if wait is not None:
                    pipe.execute_command(*wait, target_nodes=nodes[name])
                    layout.append((name, None))
            seen = self._slot_maps
            try:
                replies = await pipe.execute(raise_on_error=False, allow_redirections=False)
            except (ConnectionError, TimeoutError):
                # The node may be gone (a failover): a fresh slot map before the next write.
                self._slots_stale = True
                raise
            retry: list[_Group] = []
            reload = False
            pause = False
            moved = False
            wait_replies: dict[str, Any] = {}
            for (kind, sent), reply in zip(layout, replies, strict=True):
                if sent is None:
                    if kind != "asking":
                        wait_replies[kind] = reply
                    continue
                group = sent
                targets.pop(group.shard, None)
                if isinstance(reply, AskError) and not isinstance(reply, MovedError):
                    targets[group.shard] = (await _node_at(redis, reply), True)
                    retry.append(group)
                elif isinstance(reply, MovedError):
                    moved = True
                    retry.append(group)
                elif isinstance(reply, TryAgainError):
                    pause = True
                    retry.append(group)
                elif isinstance(reply, NoScriptError):
                    reload = True
                    retry.append(group)
                elif isinstance(reply, Exception):
                    group.error = reply
                else:
                    group.ids = [_text(i) for i in reply]
            for name, reply in wait_replies.items():
                if any(g.ids is not None for g in by_node[name]):
                    self._check_wait(reply)
            if not retry:
                return
            if moved:
                await self._refresh_slots(redis, seen)
            if reload:
                await redis.script_load(APPEND_LUA)  # on every primary
            if pause:
                await asyncio.sleep(0.05)  # a slot is moving its keys
            todo = retry
        for group in todo:
            group.error = ResponseError("the cluster kept redirecting the write; retry later")

    async def _refresh_slots(self, redis: RedisCluster, seen: int) -> None:
        """Have the client read the slot map again, unless it did since map ``seen``.

        Concurrent requests that met the same MOVED (a slot handed over) or the
        same dead node share one CLUSTER SLOTS instead of one each.
        """
        async with self._refreshing:
            if self._slot_maps != seen:
                return  # another request refreshed it while this one waited
            await redis.nodes_manager.initialize()
            self._slot_maps += 1
            self._slots_stale = False

    @staticmethod
    def _take(groups: list[_Group], replies: list[Any], *, last: bool) -> list[_Group]:
        """Record each group's ids or error; returns the groups whose script was not loaded.

        On the ``last`` attempt a missing script is an error like any other (503).
        """
        missing = []
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, NoScriptError) and not last:
                missing.append(group)
            elif isinstance(reply, Exception):
                group.error = reply
            else:
                group.ids = [_text(i) for i in reply]
        return missing


def _primary(redis: RedisCluster, key: str) -> ClusterNode:
    node = redis.get_node_from_key(key)
    assert node is not None  # the primary; None only when asking for a replica
    return node


async def _node_at(redis: RedisCluster, redirect: AskError) -> ClusterNode:
    """The node an ASK points to (a node new to this client: after a fresh slot map)."""
    node = redis.get_node(redirect.host, redirect.port)
    if node is None:
        await redis.nodes_manager.initialize()
        node = redis.get_node(redirect.host, redirect.port)
    if node is None:
        raise ResponseError(f"ASK to {redirect.host}:{redirect.port}, a node the cluster lacks")
    return node


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
