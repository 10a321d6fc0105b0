"""The aiohttp application: routes, resources, and the error contract."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError, ConnectionError, RedisError, TimeoutError

from ingest.auth import TokenAuth
from ingest.writer import TickWriter
from tickpipe import redis_conn
from tickpipe.settings import Settings
from tickpipe.ticks import TickError, tick_decoder, validate

log = logging.getLogger("tickpipe.ingest")

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
WRITER = web.AppKey("writer", TickWriter)
AUTH = web.AppKey("auth", TokenAuth)

_json = msgspec.json.Encoder()
REDIS_DOWN = (ConnectionError, TimeoutError, BusyLoadingError)


class ApiError(Exception):
    """A request that tickpipe refuses, with the status and body the contract fixes."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        index: int | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"error": code, "detail": detail}
        if index is not None:
            self.body["index"] = index
        if field is not None:
            self.body["field"] = field
        self.headers = headers or {}


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_json.encode(body), status=status, content_type="application/json", headers=headers
    )


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON: ours, aiohttp's (404, 405, 413), and Redis outages."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body, exc.status, exc.headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].ingest_max_body_bytes
        return json_response(
            {"error": "too_large", "detail": f"request body exceeds {limit} bytes"}, 413
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return json_response({"error": code, "detail": exc.reason}, exc.status, headers)
    except REDIS_DOWN as exc:
        log.warning("redis unavailable: %s", exc)
        return json_response(
            {"error": "redis_unavailable", "detail": "the tick store is unavailable; retry later"},
            503,
            {"Retry-After": "1"},
        )


def authenticate(request: web.Request) -> str:
    name = request.app[AUTH].identify(request.headers.get("Authorization"))
    if name is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="tickpipe"'},
        )
    return name


def require_json(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")


def check_length(request: web.Request) -> None:
    limit = request.app[SETTINGS].ingest_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"request body exceeds {limit} bytes")


_AT_PATH = re.compile(r" - at `\$(?:\[(?P<index>\d+)\])?(?:\.(?P<field>\w+))?")
_NAMED_FIELD = re.compile(r"(?:missing required|unknown) field `(?P<field>\w+)`")


def decode_error(exc: msgspec.DecodeError) -> ApiError:
    """400 for JSON that does not parse; 422 naming the field (and index) that is wrong."""
    message = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, "malformed_json", message)
    at = _AT_PATH.search(message)
    named = _NAMED_FIELD.search(message)
    field = named["field"] if named else (at["field"] if at else None)
    index = int(at["index"]) if at and at["index"] is not None else None
    return ApiError(422, "invalid_field", message, field=field, index=index)


async def post_tick(request: web.Request) -> web.Response:
    """POST /ingest/tick: one JSON tick."""
    token_name = authenticate(request)
    require_json(request)
    check_length(request)
    body = await request.read()
    try:
        tick = validate(tick_decoder.decode(body))
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None
    except TickError as exc:
        raise ApiError(422, "invalid_field", exc.detail, field=exc.field) from None
    ids = await request.app[WRITER].append([tick])
    log.debug("accepted 1 tick from %s: %s", token_name, ids[0])
    return json_response({"accepted": 1, "ids": ids})


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is up."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: Redis answers and the consumer group exists."""
    settings = request.app[SETTINGS]
    try:
        groups = await request.app[REDIS].xinfo_groups(settings.stream_name)
    except RedisError as exc:
        return json_response({"status": "unavailable", "detail": str(exc)}, 503)
    names = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups}
    if settings.group_name not in names:
        return json_response({"status": "unavailable", "detail": "consumer group missing"}, 503)
    return json_response({"status": "ready"})


def redis_ctx(client: Redis | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """The Redis client: ``client`` if given (tests), else one opened from REDIS_URL."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        redis = client or redis_conn.connect(settings.redis_url, client_name="tickpipe-ingest")
        app[REDIS] = redis
        app[WRITER] = TickWriter(redis, settings.stream_name, settings.latest_key)
        try:
            await redis_conn.ensure_group(redis, settings.stream_name, settings.group_name)
        except RedisError as exc:
            # Start anyway: requests get 503 until Redis is back.
            log.warning("redis unavailable at start (%s); answering 503 until it is back", exc)
        yield
        if client is None:
            await redis.aclose()

    return ctx


def create_app(settings: Settings, *, redis: Redis | None = None) -> web.Application:
    """The ingest application for ``settings`` (``redis``: a client to use instead of REDIS_URL)."""
    if not settings.ingest_tokens:
        raise ValueError("no ingest tokens configured: set INGEST_TOKENS or INGEST_TOKENS_FILE")
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.ingest_max_body_bytes
    )
    app[SETTINGS] = settings
    app[AUTH] = TokenAuth(settings.ingest_tokens)
    app.cleanup_ctx.append(redis_ctx(redis))
    app.router.add_post("/ingest/tick", post_tick)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish first."""
    web.run_app(
        create_app(settings),
        host=settings.ingest_host,
        port=settings.ingest_port,
        print=lambda line: log.info("%s", line),
        shutdown_timeout=10.0,
    )
