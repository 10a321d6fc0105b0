"""Ingest's Redis side, set up once Redis has answered: the client and what depends on it.

Whether REDIS_URL is a Redis Cluster decides the client and every key name
(hash-tagged on a cluster), and with ``REDIS_CLUSTER=auto`` only the server can
say. Ingest starts whether Redis answers or not: when it does not, requests
that need Redis get 503 while a background task asks again with backoff and
links everything once it answers. A configuration that contradicts the server
(``REDIS_CLUSTER=1`` on a single Redis, a STREAM_SHARDS other than the one
recorded for the deployment, tickpipe/core/shape.py) stops ingest at start; found
later, it is logged and every such request gets 503 saying what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from ingest import durability
from ingest.backpressure import BacklogMonitor
from ingest.errors import ApiError
from ingest.hubs import StreamHubs
from ingest.writer import TickWriter
from tickpipe.core import redis_conn, shape
from tickpipe.core.backoff import Backoff
from tickpipe.core.redis_conn import RedisClient
from tickpipe.core.settings import Settings

log = logging.getLogger("tickpipe.ingest")


@dataclasses.dataclass(frozen=True)
class Linked:
    """Everything that needs to know what kind of Redis it talks to."""

    settings: Settings
    """The process's settings with ``redis_cluster`` known (so the key names are right)."""
    redis: RedisClient
    writer: TickWriter
    backlog: BacklogMonitor
    hubs: StreamHubs


class RedisLink:
    """The :class:`Linked` side once Redis has answered; 503 for whoever asks before."""

    def __init__(self, settings: Settings, client: RedisClient | None = None) -> None:
        self._settings = settings
        self._client = client
        self._opened: RedisClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.linked: Linked | None = None
        self.problem: str | None = None
        """A configuration problem found after the start, answered with every 503."""

    async def start(self) -> None:
        """Link now if Redis answers, else in the background.

        Raises :class:`~tickpipe.core.redis_conn.RedisConfigError` when the
        configuration contradicts the server: ingest must not start.
        """
        redis = self._client
        if redis is None:
            try:
                redis = self._opened = await self._open()
            except redis_conn.UNAVAILABLE as exc:
                log.warning(
                    "Redis at %s unavailable at start (%s); answering 503 until it answers",
                    redis_conn.shown_url(self._settings.redis_url),
                    exc,
                )
                self._task = asyncio.create_task(self._link_later(None), name="redis-link")
                return
        try:
            await self._link(redis)
        except redis_conn.UNAVAILABLE as exc:
            log.warning("Redis unavailable at start (%s); answering 503 until it answers", exc)
            self._task = asyncio.create_task(self._link_later(redis), name="redis-link")

    async def _open(self) -> RedisClient:
        return await redis_conn.open_client(
            self._settings.redis_url, self._settings.redis_cluster, client_name="tickpipe-ingest"
        )

    async def _link_later(self, redis: RedisClient | None) -> None:
        try:
            if redis is None:
                redis = self._opened = await redis_conn.open_client_when_ready(
                    self._settings.redis_url,
                    self._settings.redis_cluster,
                    client_name="tickpipe-ingest",
                )
            assert redis is not None  # no stop event: it waits until Redis answers
            backoff = Backoff(cap_s=5.0)
            while True:
                try:
                    await self._link(redis)
                    break
                except redis_conn.UNAVAILABLE as exc:
                    delay = backoff.next_delay()
                    log.warning("Redis unavailable (%s); trying again in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
            log.info("Redis at %s answered: accepting ticks", self._redis_url)
        except redis_conn.RedisConfigError as exc:
            log.error("cannot use Redis: %s; answering 503 until the configuration is fixed", exc)
            self.problem = str(exc)

    @property
    def _redis_url(self) -> str:
        return redis_conn.shown_url(self._settings.redis_url)

    async def _link(self, redis: RedisClient) -> None:
        # Now known: a cluster's key names are hash-tagged even with one shard.
        settings = redis_conn.settings_for(self._settings, redis)
        await shape.claim(redis, settings)
        streams = [shard.stream for shard in settings.shard_map.shards]
        monitor = BacklogMonitor(
            redis,
            streams,
            settings.group_name,
            settings.ingest_max_backlog,
            settings.ingest_backlog_poll_s,
        )
        fsync_by: durability.FsyncBy = "waitaof"
        if settings.ingest_durability == "fsync":
            fsync_by = await durability.check(redis, settings.redis_url)
            if fsync_by == "always":
                log.info(
                    "INGEST_DURABILITY=fsync: Redis has no WAITAOF; it runs with appendfsync"
                    " always, so each reply follows the fsync"
                )
        await self._prepare(redis, settings, monitor)
        self._poller = asyncio.create_task(monitor.run(), name="backlog-monitor")
        writer = TickWriter.from_settings(redis, settings, fsync_by=fsync_by)
        if fsync_by == "always":
            self._watcher = asyncio.create_task(
                self._watch_fsync(redis, settings.redis_url, writer), name="fsync-watch"
            )
        self.linked = Linked(
            settings, redis, writer, monitor, StreamHubs(redis, streams, settings.sse_batch_s)
        )

    async def _watch_fsync(self, redis: RedisClient, url: str, writer: TickWriter) -> None:
        """Ask again, now and then, that Redis still fsyncs before it replies.

        The guarantee rests on its configuration, which an operator (or a restart
        with another redis.conf) can change; until it holds again, writes get 503.
        """
        while True:
            await asyncio.sleep(durability.RECHECK_S)
            try:
                await durability.check(redis, url)
            except redis_conn.RedisConfigError as exc:
                if writer.not_durable is None:
                    log.error("%s; refusing ticks (503) until it is fixed", exc)
                writer.not_durable = str(exc)
                continue
            except redis_conn.FAILURES as exc:
                log.debug("durability check failed: %s", exc)
                continue
            if writer.not_durable is not None:
                log.info("Redis fsyncs before it replies again: accepting ticks")
                writer.not_durable = None

    async def _prepare(
        self, redis: RedisClient, settings: Settings, monitor: BacklogMonitor
    ) -> None:
        """Create the groups and measure the backlog; an outage here only delays them."""
        try:
            for shard in settings.shard_map.shards:
                await redis_conn.ensure_group(redis, shard.stream, settings.group_name)
            monitor.backlog = await monitor.measure()
        except redis_conn.FAILURES as exc:
            if redis_conn.not_a_cluster(exc):
                raise redis_conn.not_a_cluster_error(settings.redis_url) from None
            # Go on: requests get 503 until Redis is back, and the flushers create
            # the groups too.
            log.warning("redis unavailable at start (%s); answering 503 until it is back", exc)

    def get(self) -> Linked:
        """The linked side, or a 503 saying why there is none yet."""
        if self.linked is not None:
            return self.linked
        if self.problem is not None:
            detail = f"ingest cannot use Redis: {self.problem}"
        else:
            detail = (
                "the tick store (Redis) has not answered since ingest started; nothing was"
                " stored, retry later"
            )
        raise ApiError(503, "redis_unavailable", detail, headers={"Retry-After": "1"})

    def close_streams(self) -> None:
        """End the event streams (they never finish by themselves)."""
        if self.linked is not None:
            self.linked.hubs.close()

    async def stop(self) -> None:
        for task in (self._task, self._poller, self._watcher):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.linked is not None:
            await self.linked.writer.close()
            await self.linked.hubs.stop()
        if self._opened is not None:
            await self._opened.aclose()
