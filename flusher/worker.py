"""The flusher loop: read a batch from the group, upsert it, COMMIT, then XACK.

How and why: docs/architecture.md, "The flusher loop (flusher/worker.py)".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

from flusher import metrics
from flusher.db import RowKey, StagedRows, TickStore, entry_key
from flusher.errors import RowsRejected
from flusher.faults import Faults
from flusher.retention import Retention
from flusher.shard_health import ShardHealth
from flusher.stream import (
    Claimed,
    DeadLetter,
    Delivery,
    Entry,
    GroupStats,
    ShardedStream,
    TickStream,
)
from tickpipe.core.errors import Stopping, TransientError
from tickpipe.core.service import retry
from tickpipe.core.settings import Settings
from tickpipe.core.stream_ids import id_time_ms

log = logging.getLogger("tickpipe.flusher")

T = TypeVar("T")


class Flusher:
    """One consumer of the group: batches entries into Postgres until stopped."""

    def __init__(
        self,
        streams: ShardedStream,
        store: TickStore,
        settings: Settings,
        *,
        burst: bool = False,
        faults: Faults | None = None,
    ) -> None:
        self.streams = streams
        self.store = store
        self.settings = settings
        self.burst = burst
        self.faults = faults or Faults(None)
        self._stopping = asyncio.Event()
        self._stop_deadline: float | None = None
        self._servers_ok = True
        self._in_flight: list[Delivery] = []
        """Batches being written by this process: the reclaim loop must not take them too."""
        self._health = ShardHealth({stream.shard: stream.stream for stream in streams.shards})
        self._retention = Retention(settings)
        self._silent: set[int] = set()
        """Shards whose last heartbeat failed."""
        self._drain_due: set[int] = {stream.shard for stream in streams.shards}
        """Shards whose own pending entries must be read (from 0) before anything else of theirs."""
        self._unacked: dict[int, list[bytes]] = {}
        """Per shard, ids of entries committed whose XACK failed: sent again until it succeeds."""
        self._arrivals = ArrivalRate(max(0.1, 2 * settings.flush_interval_s))
        self._reads_counted = 0
        self.batches = 0
        """Batches written (committed, or found to hold no row) and acknowledged."""
        self.rows_written = 0
        self.entries_acked = 0
        self.dead_lettered = 0
        self.dead_lettered_to: Counter[str] = Counter()
        """Entries moved by this process, per dead-letter stream."""
        self.reclaimed = 0
        self.lost = 0
        self.late_entries = 0
        """Entries this process committed after a peer had acknowledged them (taken over)."""
        self.left_pending: int | None = 0
        """After a burst: this consumer's entries still pending (None: a shard could not say)."""

    def stop(self) -> None:
        """Ask the loops to finish their in-flight batch and return. Idempotent."""
        if not self._stopping.is_set():
            log.info("stopping: finishing the in-flight batch")
            # An in-flight batch may keep retrying this long, then gives up (its
            # entries stay pending, nothing is lost).
            self._stop_deadline = time.monotonic() + self.settings.flush_shutdown_grace_s
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def reads(self) -> int:
        """XREADGROUP commands sent (new entries and own pending ones)."""
        return self.streams.reads

    # -- the loops ---------------------------------------------------------------------

    async def run(self) -> None:
        """Drain this consumer's own pending entries, then new ones, until stopped."""
        try:
            await self._retry(
                "check the deployment's shape",
                functools.partial(self.streams.claim_shape, self.settings),
            )
        except Stopping:
            return
        for stream in self.streams.shards:
            try:
                await stream.ensure_group()
            except TransientError as exc:
                # Its reads create it once it answers (NOGROUP).
                self._health.failed(stream.shard, "create the consumer group", exc)
        log.info(
            "flusher %s reading %s as group %s",
            self.streams.consumer,
            ", ".join(self.streams.names),
            self.streams.group,
        )
        # Alive before the first read, and until the last ack: peers take nothing of ours.
        await asyncio.gather(*(self._beat(stream) for stream in self.streams.shards))
        silence = asyncio.Event()
        hearts = [
            asyncio.create_task(
                self._heartbeat_loop(stream, silence), name=f"heartbeat {stream.shard}"
            )
            for stream in self.streams.shards
        ]
        try:
            await self._work()
        finally:
            # Each heart ends after the beat it may be sending (a cancellation could
            # land inside the client's connection set-up, which does not always pass
            # it on); only one that does not end in time is cancelled.
            silence.set()
            _done, late = await asyncio.wait(hearts, timeout=_SILENCE_TIMEOUT_S)
            for heart in late:
                heart.cancel()
            if late:
                await asyncio.wait(late, timeout=_SILENCE_TIMEOUT_S)
            # What this process leaves pending (a shutdown grace over) is claimed at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.streams.fall_silent(), _SILENCE_TIMEOUT_S)

    async def _work(self) -> None:
        if self.burst:
            with contextlib.suppress(Stopping):
                await self._reclaim_pass()
            await self._main_loop()
            self.left_pending = await self._count_own_pending()
            return
        helpers = [
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(self._upkeep_loop(), name="upkeep"),
        ]
        if self._retention.watches_memory:
            memory = self._retention.watch_memory(
                self.streams.shards, self._health.ready, self._sleep_unless_stopped
            )
            helpers.append(asyncio.create_task(memory, name="memory"))
        try:
            await self._main_loop()
        finally:
            self.stop()
            # The helpers notice the stop and finish their own in-flight batch.
            await asyncio.wait(helpers, timeout=self.settings.flush_shutdown_grace_s + 2)
            for helper in helpers:
                helper.cancel()

    async def _main_loop(self) -> None:
        try:
            batch = Delivery()
            while not self.stopping:
                await self._tend_shards()
                if not batch:
                    batch = await self._next_batch()
                    if not batch:
                        if not self.burst:
                            continue
                        if not self._shards_owe_work():
                            log.info("burst: nothing more to read, exiting")
                            return
                        # A shard still fails: wait for its turn rather than spin.
                        await self._sleep_unless_stopped(self._health.seconds_to_next())
                        continue
                # Write this batch while reading the next: Redis and Postgres work
                # at the same time instead of in turn.
                writing = asyncio.create_task(self._flush(batch))
                try:
                    batch = await self._next_batch()
                finally:
                    await writing
            if batch:
                await self._flush(batch)  # read before the stop: finish it too
            leftover = await self.streams.settle()
            if leftover:
                await self._flush(leftover)  # delivered by a read still under way
            await self._finish_acks()
        except Stopping:
            self.streams.abandon()
            log.warning("shutdown grace over: unfinished entries stay pending")

    def _shards_owe_work(self) -> bool:
        """Whether a shard has failed, or has its own pending entries or acks still due."""
        return self._health.failing or bool(self._drain_due) or bool(self._unacked)

    async def _tend_shards(self) -> None:
        """Send again the acks that failed, and drain own pending entries, of shards ready."""
        for shard in list(self._unacked):
            if self._health.ready(shard):
                await self._ack_again(shard)
        for stream in self.streams.shards:
            if stream.shard in self._drain_due and self._health.ready(stream.shard):
                await self._drain_own_pending_of(stream)

    async def _drain_own_pending_of(self, stream: TickStream) -> None:
        """Entries delivered to this consumer name before a crash, restart or lost reply."""
        after = "0"
        size = self.settings.flush_batch_size
        while not self.stopping:
            try:
                batch = await stream.read_own_pending(after, size)
            except TransientError as exc:
                self._health.failed(stream.shard, "read own pending entries", exc)
                return  # still due: again when the shard's wait is over
            finally:
                self._count_reads()
            self._health.answered(stream.shard)
            if not batch:
                self._drain_due.discard(stream.shard)
                return
            log.info(
                "re-processing %d pending entries of %s on %s",
                len(batch),
                stream.consumer,
                stream.stream,
            )
            await self._flush(batch)
            after = batch.last_id

    async def _next_batch(self) -> Delivery:
        """Up to FLUSH_BATCH_SIZE entries in at most three reads, never by polling.

        The first read waits up to FLUSH_INTERVAL_S for entries. The rest of the
        batch is read at once when the rate entries arrive at would have filled
        it, and at the latest FLUSH_INTERVAL_S after its oldest entry was added;
        if the rate fell short, one more read at that time tops it up. Empty when
        nothing came (the main loop tends the shards that owe work, then reads
        again).
        """
        if self.stopping:
            return Delivery()
        size = self.settings.flush_batch_size
        interval_s = self.settings.flush_interval_s
        batch = await self._read_new(size, None if self.burst else max(1, int(interval_s * 1000)))
        if batch is None:
            return Delivery()  # no shard may be read now: the main loop tends them first
        if self.burst or not batch:
            return batch  # a burst drains without waiting for more
        now = time.monotonic()
        self._arrivals.add(len(batch), now)
        # By Redis's clock, which added the entries; within [now, now + interval]
        # whatever the clocks say.
        age_s = max(0.0, time.time() - min(_entry_time(part.ids[0]) for part in batch.parts))
        deadline = now + max(0.0, interval_s - age_s)
        for _ in range(_TOP_UPS):
            need = size - len(batch)
            remaining_s = deadline - time.monotonic()
            if need <= 0 or remaining_s < _MIN_LINGER_S:
                break
            rate = self._arrivals.per_second(time.monotonic())
            fill_s = need / rate if rate > 0 else remaining_s
            if await self._sleep_unless_stopped(min(remaining_s, max(fill_s, _MIN_LINGER_S))):
                break  # stopping: this batch is written, nothing more is read
            got = await self._read_new(need, None)
            if got is None:
                break
            self._arrivals.add(len(got), time.monotonic())
            batch.extend(got)
        return batch

    async def _read_new(self, count: int, block_ms: int | None) -> Delivery | None:
        """New entries of the shards ready to be read (others wait out their backoff).

        None when no shard may be read now (after a short wait for the first).
        """
        ready = self._health.ready_among(
            s.shard for s in self.streams.shards if s.shard not in self._drain_due
        )
        if not ready:
            # Every shard waits (for its backoff, or for its own pending to be read first).
            await self._sleep_unless_stopped(max(0.01, self._health.seconds_to_next()))
            return None
        try:
            entries, failures = await self.streams.read_new(count, block_ms, ready)
        finally:
            self._count_reads()
        for shard, exc in failures.items():
            self._health.failed(shard, "read new entries", exc)
            # Redis may have delivered entries whose reply was lost: they now wait
            # in this consumer's pending list, which only a read from 0 finds.
            self._drain_due.add(shard)
        for shard in ready:
            if shard not in failures:
                self._health.answered(shard)
        return entries

    def _count_reads(self) -> None:
        reads = self.streams.reads
        metrics.READS.inc(reads - self._reads_counted)
        self._reads_counted = reads

    async def _reclaim_loop(self) -> None:
        while not await self._sleep_unless_stopped(self.settings.flush_claim_interval_s):
            if not self._servers_ok:
                continue  # the main loop is waiting out an outage; no point piling on
            try:
                await self._reclaim_pass()
            except Stopping:
                return
            except Exception:
                log.exception(
                    "reclaim pass failed; next one in %.1fs", self.settings.flush_claim_interval_s
                )

    async def _reclaim_pass(self) -> None:
        """Shard by shard, claim the pending entries of consumers that may be taken.

        Every entry of a consumer whose heartbeat expired; those idle for longer
        than FLUSH_CLAIM_IDLE_S of a consumer that never sent one, and of this
        one (rows Postgres rejected, retried); none of a live consumer. A shard
        that fails is left for a later pass; the others are reclaimed.
        """
        for stream in self.streams.shards:
            if self._health.ready(stream.shard):
                await self._reclaim_shard(stream)

    async def _reclaim_shard(self, stream: TickStream) -> None:
        try:
            holders = await stream.holders()
        except TransientError as exc:
            self._health.failed(stream.shard, "list the consumers holding entries", exc)
            return
        for owner in sorted(holders):
            if self.stopping:
                return
            if not await self._reclaim_from(stream, owner):
                return

    async def _reclaim_from(self, stream: TickStream, owner: str) -> bool:
        """Claim and write what may be taken of ``owner``'s entries; False if the shard failed."""
        idle_ms = int(self.settings.flush_claim_idle_s * 1000)
        start = "-"
        while start and not self.stopping:
            try:
                claimed = await stream.claim_from(
                    owner, start, self.settings.flush_batch_size, dead_idle_ms=0, idle_ms=idle_ms
                )
            except TransientError as exc:
                self._health.failed(stream.shard, f"reclaim the entries of {owner}", exc)
                return False
            start = claimed.next_start
            if claimed.deleted:
                # Redis dropped them from the pending list with this very reply: count
                # them now, however long the shard takes (they cannot be seen again).
                await self._count_lost(stream, claimed.deleted, _GONE)
            entries = claimed.entries
            if entries and owner == stream.consumer:
                # This process's own slow batch (a lock wait, a long drain after
                # downtime) and entries whose ack is still due: written already, or
                # being written.
                entries = entries.without(stream.shard, self._busy_ids(stream.shard))
            if entries:
                self._log_reclaim(stream, owner, claimed, len(entries))
                self.reclaimed += len(entries)
                metrics.RECLAIMED.inc(len(entries))
                await self._flush(entries)
        return True

    def _log_reclaim(self, stream: TickStream, owner: str, claimed: Claimed, count: int) -> None:
        if claimed.owner_state == "dead":
            log.warning(
                "reclaimed %d entries of %s from %s: its heartbeat expired (no sign of life"
                " for FLUSH_DEAD_AFTER_S)",
                count,
                stream.stream,
                owner,
            )
        else:
            log.info(
                "reclaimed %d entries of %s from %s (%s): idle for over %.1fs",
                count,
                stream.stream,
                owner,
                claimed.owner_state,
                self.settings.flush_claim_idle_s,
            )

    async def _heartbeat_loop(self, stream: TickStream, silence: asyncio.Event) -> None:
        """Refresh this consumer's heartbeat on ``stream``'s shard until ``silence`` is set.

        Independent of the batches: a commit stuck on Postgres does not stop it,
        only a frozen or dead process does.
        """
        interval = self.settings.flush_heartbeat_s
        while not silence.is_set():
            started = time.monotonic()
            await self._beat(stream)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    silence.wait(), max(0.0, interval - (time.monotonic() - started))
                )

    async def _beat(self, stream: TickStream) -> None:
        try:
            await stream.beat(int(self.settings.flush_dead_after_s * 1000))
        except TransientError as exc:
            if stream.shard not in self._silent:
                self._silent.add(stream.shard)
                log.warning(
                    "cannot send the heartbeat on %s: %s; if it stays silent for"
                    " FLUSH_DEAD_AFTER_S, peers take over this flusher's entries there"
                    " (written twice, harmlessly)",
                    stream.stream,
                    exc,
                )
            return
        except Exception:
            log.exception("heartbeat on %s failed", stream.stream)
            return
        if stream.shard in self._silent:
            self._silent.discard(stream.shard)
            log.info("heartbeat on %s sent again", stream.stream)

    async def _upkeep_loop(self) -> None:
        interval = self.settings.flush_upkeep_interval_s
        while not await self._sleep_unless_stopped(interval):
            try:
                await self.upkeep()
            except TransientError as exc:
                log.warning("upkeep skipped: %s", exc)
            except Exception:
                log.exception("upkeep failed; next one in %.1fs", interval)

    async def upkeep(self) -> None:
        """Per shard: trim what no group needs, delete idle consumers; publish pending and lag,
        and the age of the oldest pending entry.

        A shard that fails is skipped (its figures are missing from the totals).
        """
        pending, lag, oldest_s = 0, 0, 0.0
        for stream in self.streams.shards:
            try:
                stats = await self._upkeep_shard(stream)
            except TransientError as exc:
                log.warning("upkeep of %s skipped: %s", stream.stream, exc)
                continue
            pending += stats.pending
            lag += stats.lag or 0
            if stats.oldest_pending_id is not None:
                age_s = time.time() - _entry_time(stats.oldest_pending_id.encode())
                oldest_s = max(oldest_s, age_s)
        metrics.PENDING.set(pending)
        metrics.LAG.set(lag)
        metrics.OLDEST_PENDING.set(oldest_s)

    async def _upkeep_shard(self, stream: TickStream) -> GroupStats:
        await self._retention.trim(stream)
        idle_ms = int(self.settings.flush_consumer_idle_delete_s * 1000)
        for name in await stream.delete_idle_consumers(idle_ms):
            log.info("deleted consumer %s of %s: idle with nothing pending", name, stream.stream)
        return await stream.stats()

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; True as soon as a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self.stopping

    # -- one batch -----------------------------------------------------------------------

    async def _flush(self, batch: Delivery) -> None:
        self._in_flight.append(batch)
        try:
            # COMMIT then XACK as one step that a cancellation cannot split.
            await asyncio.shield(self._commit_then_ack(batch))
        finally:
            self._in_flight.remove(batch)

    async def _commit_then_ack(self, batch: Delivery) -> None:
        started = time.perf_counter()
        # One row per key, built from the entries' bytes; the rare entry that gives
        # none is set aside (deleted while pending, or undecodable).
        staged = StagedRows.of([(part.ids, part.fields) for part in batch.parts])
        undecodable: list[tuple[Entry, str]] = []
        gone: list[Entry] = []
        for number, index, why in staged.skipped:
            entry = batch.parts[number].entry(index)
            if why is None:
                gone.append(entry)
            else:
                undecodable.append((entry, f"undecodable: {why}"))
        await self.faults.hit("after_read")

        rejected_keys = await self._upsert_isolating(staged, None)
        rejected = _entries_with_keys(batch, rejected_keys) if rejected_keys else []
        await self.faults.hit("after_commit")

        counted: list[Entry] = []
        for shard, entries in _by_shard(gone).items():
            stream = self.streams.shards_by_index[shard]
            try:
                total = await stream.count_lost([entry.id for entry in entries])
            except TransientError as exc:
                # Left pending: read again (and counted) once the shard answers.
                self._health.failed(shard, "count lost entries", exc)
                continue
            self._report_lost(stream, [entry.id for entry in entries], total, _GONE)
            counted.extend(entries)
        # Acknowledge every entry but those left pending: undecodable and rejected
        # ones (dead-lettered or retried below), and lost ones not counted yet.
        held = {(entry.shard, entry.id.encode()) for entry, _ in (*undecodable, *rejected)}
        held.update((entry.shard, entry.id.encode()) for entry in gone if entry not in counted)
        acks: dict[int, list[bytes]] = defaultdict(list)
        for part in batch.parts:
            if held:
                acks[part.shard].extend(i for i in part.ids if (part.shard, i) not in held)
            else:
                acks[part.shard].extend(part.ids)
        acked = sum(len(ids) for ids in acks.values())
        failed = await self._acknowledge(acks)
        await self.faults.hit("after_ack")

        rows_written = len(staged.rows) - len(rejected_keys)
        if rows_written:
            # The batch's oldest entry waited longest: its lag bounds every tick's.
            oldest = min(_entry_time(part.ids[0]) for part in batch.parts)
            metrics.COMMIT_LAG.observe(max(0.0, time.time() - oldest))
        self.rows_written += rows_written
        self.entries_acked += acked - failed
        self.batches += 1
        metrics.BATCHES.inc()
        metrics.ROWS.inc(rows_written)
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        log.debug(
            "committed %d rows, acked %d entries in %.1f ms",
            rows_written,
            acked,
            (time.perf_counter() - started) * 1000,
        )
        if undecodable or rejected:
            await self._handle_poison(undecodable, rejected)

    async def _upsert_isolating(
        self, staged: StagedRows, keys: Sequence[RowKey] | None
    ) -> dict[RowKey, str]:
        """Upsert the rows of ``keys`` (None: all); when Postgres rejects rows, bisect so
        the rest commits.

        Returns the keys whose rows were rejected, with the reason. The entries of
        a key share the fate of its row (the last entry's).
        """
        if not staged.rows or (keys is not None and not keys):
            return {}
        await self.faults.hit("before_commit")
        try:
            await self._retry(
                "write the batch to Postgres",
                functools.partial(self.store.write, staged.text(keys)),
            )
        except RowsRejected as exc:
            keys = list(staged.rows) if keys is None else keys
            if len(keys) == 1:
                return {keys[0]: str(exc)}
            middle = len(keys) // 2
            return {
                **await self._upsert_isolating(staged, keys[:middle]),
                **await self._upsert_isolating(staged, keys[middle:]),
            }
        return {}

    async def _handle_poison(
        self, undecodable: Sequence[tuple[Entry, str]], rejected: Sequence[tuple[Entry, str]]
    ) -> None:
        """Dead-letter undecodable entries at once, rejected rows after FLUSH_MAX_DELIVERIES.

        A decode error is permanent: the same fields fail the same way on every
        delivery. A row Postgres rejects may be taken later (a constraint fixed),
        so it stays pending and is retried until its deliveries reach the limit.
        On a shard that fails, its entries stay pending and come back by reclaim.
        """
        by_shard: dict[int, list[_Poison]] = defaultdict(list)
        for entry, reason in undecodable:
            by_shard[entry.shard].append(_Poison(entry, reason, permanent=True))
        for entry, reason in rejected:
            by_shard[entry.shard].append(_Poison(entry, reason, permanent=False))
        for shard, shard_poison in by_shard.items():
            try:
                await self._handle_shard_poison(self.streams.shards_by_index[shard], shard_poison)
            except TransientError as exc:
                self._health.failed(shard, "dead-letter entries", exc)

    async def _handle_shard_poison(self, stream: TickStream, poison: Sequence[_Poison]) -> None:
        deliveries = await stream.deliveries([p.entry.id for p in poison])
        limit = self.settings.flush_max_deliveries
        letters = []
        for entry, reason, permanent in poison:
            count = deliveries.get(entry.id, limit)
            if permanent or count >= limit:
                letters.append(DeadLetter(entry, reason, count))
            else:
                log.warning(
                    "entry %s failed (%s), delivery %d of %d: left pending, retried after %.0fs",
                    entry.id,
                    reason,
                    count,
                    limit,
                    self.settings.flush_claim_idle_s,
                )
        if letters:
            moved = await stream.dead_letter(letters)
            for letter in letters:
                log.error(
                    "dead-lettered entry %s to %s at delivery %d: %s",
                    letter.entry.id,
                    stream.dead_stream,
                    letter.deliveries,
                    letter.reason,
                )
            self.dead_lettered += moved
            self.dead_lettered_to[stream.dead_stream] += moved
            self.entries_acked += moved
            metrics.DEAD_LETTERED.inc(moved)

    async def _count_own_pending(self) -> int | None:
        """This consumer's pending entries on every shard; None if a shard cannot say."""
        total = 0
        for stream in self.streams.shards:
            try:
                total += await stream.own_pending()
            except TransientError as exc:
                log.warning("cannot count the entries pending on %s: %s", stream.stream, exc)
                return None
        return total

    async def _count_lost(self, stream: TickStream, ids: Sequence[str], why: str) -> None:
        total = await self._retry("count lost entries", functools.partial(stream.count_lost, ids))
        self._report_lost(stream, ids, total, why)

    def _report_lost(self, stream: TickStream, ids: Sequence[str], total: int, why: str) -> None:
        self.lost += len(ids)
        metrics.LOST.inc(len(ids))
        log.error(
            "LOST %d entries of %s (%s): %s; lost so far on that shard: %d",
            len(ids),
            stream.stream,
            why,
            ", ".join(ids),
            total,
        )

    # -- acknowledgements ------------------------------------------------------------------

    def _busy_ids(self, shard: int) -> set[bytes]:
        """Ids of ``shard`` being written by this process, or written and waiting for their ack."""
        busy = set(self._unacked.get(shard, ()))
        for batch in self._in_flight:
            for part in batch.parts:
                if part.shard == shard:
                    busy.update(part.ids)
        return busy

    async def _acknowledge(self, ids_by_shard: Mapping[int, list[bytes]]) -> int:
        """XACK the ids of each shard; returns how many wait for a later try (shard failed)."""
        ids_by_shard = {shard: ids for shard, ids in ids_by_shard.items() if ids}
        if not ids_by_shard:
            return 0
        acked, failures = await self.streams.ack(ids_by_shard)
        late = sum(len(ids_by_shard[shard]) - count for shard, count in acked.items())
        if late > 0:
            self._report_late(late)
        deferred = 0
        for shard, exc in failures.items():
            waiting = ids_by_shard[shard]
            self._unacked.setdefault(shard, []).extend(waiting)
            deferred += len(waiting)
            self._health.failed(
                shard, f"acknowledge {len(waiting)} written entries (kept, sent again)", exc
            )
        for shard in ids_by_shard.keys() - failures.keys():
            self._health.answered(shard)
        return deferred

    def _report_late(self, entries: int) -> None:
        """A batch committed after a peer took its entries over (and acknowledged them)."""
        self.late_entries += entries
        metrics.LATE_COMMITS.inc()
        metrics.LATE_COMMIT_ENTRIES.inc(entries)
        log.warning(
            "%d entries of this batch were acknowledged already: a peer took them over while"
            " this flusher's heartbeat was silent (frozen, starved or cut off for"
            " FLUSH_DEAD_AFTER_S) and wrote them too; md_ticks keeps each key's latest entry",
            entries,
        )

    async def _ack_again(self, shard: int) -> None:
        entries = self._unacked.pop(shard)
        # Fewer acknowledged than sent is expected here: the XACK whose reply was
        # lost may have run.
        _acked, failures = await self.streams.ack({shard: entries})
        if shard in failures:
            # Others may have joined meanwhile (a reclaimed batch's).
            self._unacked.setdefault(shard, []).extend(entries)
            self._health.failed(
                shard, f"acknowledge {len(entries)} written entries (kept)", failures[shard]
            )
            return
        self._health.answered(shard)
        self.entries_acked += len(entries)
        log.info("acknowledged %d entries of shard %d at last", len(entries), shard)

    async def _finish_acks(self) -> None:
        """At stop: send the acks still due until they succeed or the grace is over."""
        while self._unacked:
            deadline = self._stop_deadline
            if deadline is not None and time.monotonic() > deadline:
                left = sum(len(entries) for entries in self._unacked.values())
                log.warning(
                    "%d written entries of shards %s are not acknowledged: they stay pending"
                    " and are written again (harmlessly) by this or another flusher",
                    left,
                    ", ".join(map(str, sorted(self._unacked))),
                )
                return
            await asyncio.sleep(self._health.seconds_to_next())
            for shard in list(self._unacked):
                if self._health.ready(shard):
                    await self._ack_again(shard)

    # -- retries -------------------------------------------------------------------------

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``, retrying TransientError with backoff until it succeeds.

        After a stop request, gives up once the shutdown grace has passed (raising
        :class:`Stopping`): what was not acknowledged stays pending, and a COMMIT
        without its XACK is replayed harmlessly (the upsert is idempotent).
        """

        def give_up(exc: TransientError) -> bool:
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                log.error("giving up on: %s (%s); entries stay pending", what, exc)
                return True
            return False

        def servers_failed() -> None:
            self._servers_ok = False

        async def pause(delay: float) -> bool:
            await asyncio.sleep(delay)
            return False

        result = await retry(
            what, operation, log=log, give_up=give_up, wait=pause, on_failure=servers_failed
        )
        self._servers_ok = True
        return result


_GONE = "deleted from the stream while pending"
_SILENCE_TIMEOUT_S = 2.0
"""At stop, how long ending the heartbeats, then dropping their keys, may take (Redis may
be down)."""


class _Poison(NamedTuple):
    """An entry that failed, why, and whether retrying it is pointless (undecodable)."""

    entry: Entry
    reason: str
    permanent: bool


_TOP_UPS = 2
"""Reads of a batch after the first, at most."""
_MIN_LINGER_S = 0.001
"""Less time than this left to wait: no read (the last one drained the stream)."""


class ArrivalRate:
    """Entries per second delivered to this consumer, averaged over about ``window_s``.

    An exponentially decaying count: each delivery adds its entries, and the
    count fades with time constant ``window_s``; count / window_s is the rate.
    """

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._count = 0.0
        self._at = time.monotonic()

    def add(self, entries: int, now: float) -> None:
        self._count = self._faded(now) + entries
        self._at = now

    def per_second(self, now: float) -> float:
        return self._faded(now) / self._window_s

    def _faded(self, now: float) -> float:
        return self._count * math.exp(-max(0.0, now - self._at) / self._window_s)


def _by_shard(entries: Sequence[Entry]) -> dict[int, list[Entry]]:
    by_shard: dict[int, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_shard[entry.shard].append(entry)
    return by_shard


def _entries_with_keys(batch: Delivery, reasons: Mapping[RowKey, str]) -> list[tuple[Entry, str]]:
    """The entries of ``batch`` whose rows have these keys, each with its key's reason."""
    found = []
    for part in batch.parts:
        for index, entry_id in enumerate(part.ids):
            key = entry_key(entry_id, part.fields[index])
            if key is not None and key in reasons:
                found.append((part.entry(index), f"rejected by Postgres: {reasons[key]}"))
    return found


def _entry_time(entry_id: bytes) -> float:
    """The wall-clock time (seconds) at which Redis created a stream entry."""
    return id_time_ms(entry_id.decode()) / 1000
