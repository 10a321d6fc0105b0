"""Running one flusher process: connections, signals, metrics endpoint, exit status."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from flusher.db import TickStore
from flusher.faults import Faults
from flusher.stream import ShardedStream
from flusher.worker import Flusher
from tickpipe.core import redis_conn, shape
from tickpipe.core.service import serve
from tickpipe.core.settings import Settings
from tickpipe.core.signals import SIGNALS

log = logging.getLogger("tickpipe.flusher")


class FlusherError(RuntimeError):
    """The flusher cannot work with this configuration; the message says what to do."""


async def run_flusher(settings: Settings, *, burst: bool = False) -> Flusher | None:
    """Run a flusher until SIGTERM/SIGINT (or, with ``burst``, until the stream is drained).

    Returns None when stopped before Redis first answered (nothing was read).
    """
    consumer = settings.flusher_consumer
    try:
        faults = Faults(settings.fault)
    except ValueError as exc:
        raise FlusherError(str(exc)) from None
    redis = await _open_redis(settings, consumer)
    if redis is None:
        log.info("flusher %s stopped before Redis answered: nothing was read", consumer)
        return None
    try:
        settings = redis_conn.settings_for(settings, redis)
    except redis_conn.RedisConfigError as exc:
        await redis.aclose()
        raise FlusherError(str(exc)) from None
    store = await TickStore.open(settings.database_url)
    streams = ShardedStream.for_consumer(redis, settings, consumer)
    flusher = Flusher(streams, store, settings, burst=burst, faults=faults)

    async def close() -> None:
        await store.close()
        await redis.aclose()

    await serve(
        flusher.run(),
        flusher,
        name="flusher",
        log=log,
        grace_s=settings.flush_shutdown_grace_s + 2,
        metrics_port=settings.flusher_metrics_port,
        metrics_host=settings.flusher_metrics_host,
        close=close,
        error=FlusherError,
        second_signal="stopping now; unacknowledged entries stay pending",
        interrupted="stopped before the in-flight batch could finish; its entries stay pending"
        " and will be written by this or another flusher",
        fatal_suffix=". Nothing was acknowledged: the entries wait in the stream.",
    )
    log.info(
        "flusher %s stopped: %d rows written, %d entries acknowledged, %d reclaimed,"
        " %d dead-lettered, %d lost, %d committed late (taken over by a peer meanwhile);"
        " %d batches, %d reads (XREADGROUP)",
        consumer,
        flusher.rows_written,
        flusher.entries_acked,
        flusher.reclaimed,
        flusher.dead_lettered,
        flusher.lost,
        flusher.late_entries,
        flusher.batches,
        flusher.reads,
    )
    if burst:
        problems = burst_problems(flusher)
        for problem in problems:
            log.error("burst: %s", problem)
        if not problems:
            log.info(
                "burst: %s; nothing dead-lettered, nothing left pending",
                "stopped" if flusher.stopping else "stream drained",
            )
    return flusher


def burst_problems(flusher: Flusher) -> list[str]:
    """What a ``--burst`` run leaves to an operator; empty when it drained the stream cleanly.

    Dead letters need a decision (``tickpipe dlq``); entries left pending (rows
    Postgres rejected fewer than FLUSH_MAX_DELIVERIES times, a shard that failed)
    are not in Postgres yet.
    """
    problems = [
        f"{_entries(count)} dead-lettered to {dead_stream}; see `tickpipe dlq list`"
        for dead_stream, count in sorted(flusher.dead_lettered_to.items())
        if count
    ]
    consumer = flusher.streams.consumer
    if flusher.left_pending is None:
        problems.append(
            f"could not count the entries left pending by {consumer}; see `tickpipe audit`"
        )
    elif flusher.left_pending:
        problems.append(
            f"{_entries(flusher.left_pending)} left pending by {consumer}, not in Postgres yet:"
            " retried by the next run (or by a running flusher once this one's heartbeat"
            " expires),"
            " dead-lettered after FLUSH_MAX_DELIVERIES; see `tickpipe audit`"
        )
    return problems


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


async def _open_redis(settings: Settings, consumer: str) -> redis_conn.RedisClient | None:
    """The client, once Redis answers (whether it is a cluster decides every key name).

    A signal while waiting stops the wait: None.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await redis_conn.open_client_when_ready(
            settings.redis_url,
            settings.redis_cluster,
            client_name=f"tickpipe-flusher:{consumer}",
            socket_timeout_s=max(redis_conn.REDIS_SOCKET_TIMEOUT_S, settings.flush_interval_s + 10),
            stop=stop,
        )
    except redis_conn.RedisConfigError as exc:
        raise FlusherError(str(exc)) from None
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)


async def check(settings: Settings) -> list[str]:
    """Problems that would stop a flusher from working (empty when it could run)."""
    problems: list[str] = []
    try:
        redis = await redis_conn.open_client(
            settings.redis_url, settings.redis_cluster, client_name="tickpipe-flusher-check"
        )
        try:
            settings = redis_conn.settings_for(settings, redis)
            deployed = await shape.recorded(redis, settings.stream_name)
            if deployed is not None and deployed != shape.Shape.of(settings):
                problems.append(
                    f"STREAM_SHARDS: the deployment runs {deployed.describe()}, not"
                    f" {shape.Shape.of(settings).describe()} ({shape.DRAIN_DOC})"
                )
            for shard in settings.flusher_shard_set:
                await redis_conn.ensure_group(redis, shard.stream, settings.group_name)
        finally:
            await redis.aclose()
    except redis_conn.RedisConfigError as exc:
        problems.append(f"Redis at REDIS_URL: {exc}")
    except redis_conn.FAILURES as exc:
        problems.append(f"Redis at REDIS_URL: {exc}")
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        problems.append(f"Postgres at DATABASE_URL: {exc}")
    else:
        try:
            await conn.execute("SELECT 1 FROM md_ticks LIMIT 0")
        except asyncpg.PostgresError as exc:
            problems.append(f"Postgres at DATABASE_URL: {exc} (run `tickpipe schema apply`)")
        finally:
            await conn.close()
    return problems
