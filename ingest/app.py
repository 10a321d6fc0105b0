"""The aiohttp application: routes, resources, and the checks every request passes.

A request is refused, in this order, for: no valid token (401), a content type
it cannot read (415), a body too large (413), a backlog above the limit (429),
a body that is not JSON (400), a tick that breaks a rule (422). Only then is it
appended, in one atomic step, and answered 200 with the stream ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from ingest import chart, metrics, queries, ranges, sse
from ingest.appkeys import AUTH, INFLIGHT, LINK, READ_AUTH, REMINDERS, REQUEST_TIMES, SETTINGS
from ingest.auth import TokenAuth
from ingest.decode import decode_json_array, decode_ndjson, decode_tick
from ingest.errors import ApiError, Reminders, error_middleware, json_response, unauthorized
from ingest.inflight import InFlight
from ingest.link import RedisLink
from ingest.openapi import openapi_document
from tickpipe.core import loop, redis_conn
from tickpipe.core.redis_conn import RedisClient
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick

log = logging.getLogger("tickpipe.ingest")

TOKEN_NAME = web.RequestKey("token_name", str)

JSON = "application/json"
NDJSON = "application/x-ndjson"


# -- the checks ---------------------------------------------------------------------


def authenticate(request: web.Request) -> str:
    authorization = request.headers.get("Authorization")
    name = request.app[AUTH].identify(authorization)
    if name is None and (reader := request.app[READ_AUTH].identify(authorization)) is not None:
        request[TOKEN_NAME] = reader
        raise ApiError(403, "forbidden", f"token {reader!r} may read but not ingest")
    if name is None:
        raise unauthorized()
    request[TOKEN_NAME] = name
    return name


def require_content_type(request: web.Request, *accepted: str) -> str:
    if request.content_type not in accepted:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be {' or '.join(accepted)}, not {request.content_type!r}",
        )
    return request.content_type


def check_declared_length(request: web.Request) -> None:
    """Refuse on Content-Length before reading; chunked bodies stop at the same limit."""
    limit = request.app[SETTINGS].ingest_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"request body exceeds {limit} bytes")


def check_backlog(request: web.Request) -> None:
    linked = request.app[LINK].linked
    if linked is None:
        return  # not measured yet: the write answers 503 anyway
    monitor = linked.backlog
    if monitor.over_limit:
        raise ApiError(
            429,
            "backpressure",
            f"the flushers are {monitor.backlog} entries behind (limit {monitor.limit});"
            " retry later",
            headers={"Retry-After": "1"},
        )


async def store(
    request: web.Request, token_name: str, ticks: list[Tick], size: int
) -> web.Response:
    """Append the ticks and answer their ids; a failure is answered by error_middleware."""
    ids = await request.app[LINK].get().writer.append(ticks, size=size, token=token_name)
    log.debug("accepted %d ticks from %s, first id %s", len(ticks), token_name, ids[0])
    return json_response({"accepted": len(ids), "ids": ids})


# -- handlers -----------------------------------------------------------------------


async def post_tick(request: web.Request) -> web.Response:
    """POST /ingest/tick: one JSON tick."""
    token_name = authenticate(request)
    require_content_type(request, JSON)
    check_declared_length(request)
    check_backlog(request)
    body = await request.read()
    return await store(request, token_name, [decode_tick(body)], len(body))


async def post_ticks(request: web.Request) -> web.Response:
    """POST /ingest/ticks: a JSON array or NDJSON, all or nothing."""
    token_name = authenticate(request)
    content_type = require_content_type(request, JSON, NDJSON)
    check_declared_length(request)
    check_backlog(request)
    body = await request.read()
    max_batch = request.app[SETTINGS].ingest_max_batch
    if content_type == NDJSON:
        ticks = decode_ndjson(body, max_batch)
    else:
        ticks = decode_json_array(body, max_batch)
    return await store(request, token_name, ticks, len(body))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is up."""
    return json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: Redis answers and every shard's stream has the consumer group."""
    link = request.app[LINK]
    try:
        linked = link.get()
    except ApiError as exc:
        return json_response({"status": "unavailable", "detail": str(exc)}, 503)
    settings, redis = linked.settings, linked.redis
    if linked.writer.not_durable is not None:
        return json_response({"status": "unavailable", "detail": linked.writer.not_durable}, 503)
    streams = [shard.stream for shard in settings.shard_map.shards]
    try:
        replies = await asyncio.gather(*(redis.xinfo_groups(stream) for stream in streams))
    except redis_conn.FAILURES as exc:
        return json_response({"status": "unavailable", "detail": f"redis: {exc}"}, 503)
    missing = [
        stream
        for stream, groups in zip(streams, replies, strict=True)
        if settings.group_name not in {redis_conn.text(g["name"]) for g in groups}
    ]
    if missing:
        return json_response(
            {"status": "unavailable", "detail": f"consumer group missing on {', '.join(missing)}"},
            503,
        )
    return json_response({"status": "ready"})


async def metrics_view(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    request.app[REQUEST_TIMES].flush()
    body, content_type = metrics.render(request.app[SETTINGS].prometheus_multiproc_dir)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi_view(request: web.Request) -> web.Response:
    """GET /openapi.json."""
    return json_response(openapi_document())


# -- middleware and resources -------------------------------------------------------


@web.middleware
async def timing_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Times ingest requests and counts every request in flight (see :class:`InFlight`)."""
    started = time.perf_counter()
    inflight = request.app[INFLIGHT]
    inflight.enter()
    try:
        response = await handler(request)
        if inflight.stopping:
            response.force_close()  # no next request on this connection
        return response
    finally:
        inflight.leave()
        if request.path.startswith("/ingest/"):
            request.app[REQUEST_TIMES].add(request.path, time.perf_counter() - started)


def record_refusal(request: web.Request, error: ApiError) -> None:
    token_name = request.get(TOKEN_NAME, "anonymous")
    if request.path.startswith("/ingest/"):
        metrics.REJECTED_REQUESTS.labels(reason=error.code, token=token_name).inc()
    if error.status >= 500:
        # The same outage or misconfiguration fails every request: once, then reminders.
        request.app[REMINDERS].log(
            f"{error.status} {error.code}",
            logging.WARNING,
            "refusing requests with %s %s: %s",
            error.status,
            error.code,
            error.cause or error,
        )
        return
    level = logging.INFO if error.status in (401, 429) else logging.DEBUG
    log.log(level, "refused %s %s from %s: %s", error.status, error.code, token_name, error)


async def request_times_ctx(app: web.Application) -> AsyncIterator[None]:
    """Fold the request durations into the histogram every second, and at the end."""
    times = app[REQUEST_TIMES]

    async def every_second() -> None:
        while True:
            await asyncio.sleep(1.0)
            times.flush()

    task = asyncio.create_task(every_second(), name="request-times")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        times.flush()


def redis_ctx(client: RedisClient | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """The Redis side: ``client`` if given (tests), else one opened from REDIS_URL."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        link = app[LINK] = RedisLink(app[SETTINGS], client)
        try:
            await link.start()
            yield
        finally:
            await link.stop()

    return ctx


def create_app(settings: Settings, *, redis: RedisClient | None = None) -> web.Application:
    """The ingest application for ``settings`` (``redis``: a client to use instead of REDIS_URL)."""
    if not settings.ingest_tokens:
        raise ValueError("no ingest tokens configured: set INGEST_TOKENS or INGEST_TOKENS_FILE")
    app = web.Application(
        middlewares=[
            timing_middleware,
            error_middleware(settings.ingest_max_body_bytes, record_refusal),
        ],
        client_max_size=settings.ingest_max_body_bytes,
    )
    app[SETTINGS] = settings
    app[AUTH] = TokenAuth(settings.ingest_tokens)
    app[READ_AUTH] = TokenAuth({**settings.ingest_tokens, **settings.read_tokens})
    app[INFLIGHT] = InFlight()
    app[REMINDERS] = Reminders(log)
    app[REQUEST_TIMES] = metrics.RequestTimes()
    app.cleanup_ctx.append(request_times_ctx)
    app.cleanup_ctx.append(redis_ctx(redis))
    app.cleanup_ctx.append(queries.store_ctx)
    app.on_shutdown.append(sse.end_streams)
    app.router.add_post("/ingest/tick", post_tick)
    app.router.add_post("/ingest/ticks", post_ticks)
    # Before /ticks/{symbol}: "stream" is a path word here, not a symbol.
    app.router.add_get("/ticks/stream", sse.stream_ticks)
    app.router.add_get("/ticks/{symbol}/latest", queries.get_latest)
    app.router.add_get("/ticks/{symbol}", queries.get_ticks)
    app.router.add_get("/ranges/{symbol}", ranges.get_ranges)
    chart.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/openapi.json", openapi_view)
    return app


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGINT/SIGTERM, then let in-flight requests finish before exiting."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    try:
        await runner.setup()
    except redis_conn.RedisConfigError:
        await runner.cleanup()
        raise
    site = web.TCPSite(
        runner, settings.ingest_host, settings.ingest_port, reuse_port=reuse_port or None
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(
            f"cannot listen on {settings.ingest_host}:{settings.ingest_port}: {exc.strerror}"
        ) from None
    log.info("ingest listening on http://%s:%d", settings.ingest_host, settings.ingest_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    inflight = app[INFLIGHT]
    inflight.stopping = True
    app[LINK].close_streams()  # event streams end now; other requests finish
    log.info("ingest stopping: %d requests in flight", inflight.count)
    await site.stop()
    if not await inflight.drained(settings.ingest_shutdown_timeout_s):
        log.warning("ingest: %d requests still in flight after the timeout", inflight.count)
    await runner.cleanup()


class ListenError(OSError):
    """The ingest address cannot be bound (port in use, address not local...)."""


def run(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish first."""
    loop.run(serve(settings, reuse_port=reuse_port))
