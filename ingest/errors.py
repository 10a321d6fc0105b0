"""The error contract: every refusal is JSON ``{"error", "detail", "index"?, "field"?}``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web
from redis.exceptions import ResponseError

from tickpipe.core.redis_conn import UNAVAILABLE

log = logging.getLogger("tickpipe.ingest")

_json = msgspec.json.Encoder()

REDIS_DOWN = UNAVAILABLE
"""Redis errors that mean "unavailable right now" (a cluster failing over too): 503, retry later."""


ERROR_CODES = [
    "malformed_json",
    "unauthorized",
    "forbidden",
    "too_large",
    "batch_too_large",
    "unsupported_media_type",
    "invalid_field",
    "invalid_batch",
    "invalid_parameter",
    "backpressure",
    "redis_unavailable",
    "not_durable",
    "partially_stored",
    "store_unavailable",
    "too_many_clients",
    "not_found",
    "rollups_disabled",
    "method_not_allowed",
]
"""The codes the OpenAPI document lists; each status there narrows them to its own."""


class ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    """Every refusal. `index` (0-based) names a tick of a batch."""

    # A str, not a Literal: a defect's 500 (internal_error) is not a documented code.
    error: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ERROR_CODES})]
    detail: Annotated[str, msgspec.Meta(description="What was wrong and what to do, for a person.")]
    index: Annotated[int, msgspec.Meta(ge=0)] | msgspec.UnsetType = msgspec.UNSET
    field: (
        Annotated[str, msgspec.Meta(description="The tick field, parameter or header to blame.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET


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
        self.code = code
        self.body = ErrorBody(
            code,
            detail,
            msgspec.UNSET if index is None else index,
            msgspec.UNSET if field is None else field,
        )
        self.headers = headers or {}
        self.cause: str | None = None
        """What went wrong underneath, for the log (never sent to the client)."""


class WriteFailed(Exception):
    """A write to the tick store that failed in a way the client must hear about (503)."""

    code = "redis_unavailable"

    @property
    def detail(self) -> str:
        return str(self)


class Reminders:
    """Log a recurring problem once, then at most one reminder per ``interval_s``.

    A misconfigured or unavailable Redis fails every request the same way; one
    line per request would bury everything else in the log.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}
        """Per problem: when it was last logged, and how often it recurred since."""

    def log(self, key: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is None:
            self._log.log(level, message, *args)
            self._last[key] = (now, 0)
            return
        logged_at, since = last
        if now - logged_at < self.interval_s:
            self._last[key] = (logged_at, since + 1)
            return
        self._log.log(
            level, message + " (still so: %d more like it in the last %.0fs)", *args, since,
            now - logged_at,
        )  # fmt: skip
        self._last[key] = (now, 0)


def unauthorized() -> ApiError:
    """401: no bearer token, or one that no configured token matches."""
    return ApiError(
        401,
        "unauthorized",
        "missing or invalid bearer token (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": 'Bearer realm="tickpipe"'},
    )


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_json.encode(body), status=status, content_type="application/json", headers=headers
    )


OnError = Callable[[web.Request, ApiError], None]


def error_middleware(max_body_bytes: int, on_error: OnError) -> Any:
    """Turn ours, aiohttp's (404, 405, 413), failed writes and Redis outages into JSON errors.

    The one place where a failure becomes the client's answer.
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            error = exc
        except WriteFailed as exc:
            error = ApiError(503, exc.code, exc.detail, headers={"Retry-After": "1"})
        except web.HTTPRequestEntityTooLarge:
            error = ApiError(413, "too_large", f"request body exceeds {max_body_bytes} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            error = ApiError(
                exc.status,
                exc.reason.lower().replace(" ", "_"),
                exc.reason,
                headers={k: v for k, v in exc.headers.items() if k.lower() != "content-type"},
            )
        except REDIS_DOWN as exc:  # before ResponseError: CLUSTERDOWN, TRYAGAIN are both
            error = ApiError(
                503,
                "redis_unavailable",
                "the tick store (Redis) is unavailable; nothing was stored, retry later",
                headers={"Retry-After": "1"},
            )
            error.cause = f"redis unavailable: {type(exc).__name__}: {exc}"
        except ResponseError as exc:
            # MISCONF, OOM, READONLY...: Redis is up but will not take the write.
            error = ApiError(
                503,
                "redis_unavailable",
                f"the tick store (Redis) refused the write ({exc}); nothing was stored",
                headers={"Retry-After": "1"},
            )
            error.cause = f"redis refused the request: {exc}"
        except Exception:  # a defect: still a JSON answer, and the traceback in the log
            log.exception("internal error answering %s %s", request.method, request.path)
            error = ApiError(500, "internal_error", "an internal error occurred; see the log")
        on_error(request, error)
        return json_response(error.body, error.status, error.headers)

    return middleware
