"""The OpenAPI 3.1 description served at ``GET /openapi.json``.

Written by hand so that it says exactly what the service does (the request's
``Tick`` and the ``Error`` body are generated from the msgspec models that
decode and encode them, ingest/openapi_schemas.py): each refusal lists the
error codes its status can carry. A test checks real responses
against it and that every documented answer can be produced; another sends
thousands of requests generated from it, good and bad, and follows its links
(schemathesis, tests/ingest/test_schemathesis.py).
"""

from __future__ import annotations

from typing import Any

from ingest.chart import ASSETS
from ingest.openapi_schemas import SCHEMAS, SYMBOL
from ingest.queries import DEFAULT_LIMIT, MAX_LIMIT
from ingest.sse import LAST_EVENT_ID_PATTERN, MAX_SYMBOLS
from tickpipe import __version__
from tickpipe.core.ticks import TS_MS_SCHEMA, TS_TEXT_SCHEMA

_SECURITY = {
    "type": "http",
    "scheme": "bearer",
    "description": (
        "`Authorization: Bearer <token>`. A token has one of two roles, which each"
        " operation lists: `ingest`, the tokens of INGEST_TOKENS (or INGEST_TOKENS_FILE),"
        " may ingest and read; `read`, the tokens of READ_TOKENS (or READ_TOKENS_FILE),"
        " may only read, and is refused with 403 `forbidden` on the ingest routes. A"
        " missing or unknown token is 401 `unauthorized` with `WWW-Authenticate: Bearer`."
        " Logs and metrics name a token by its name, never by its value."
    ),
}
_INGEST_ROLE = [{"bearer": ["ingest"]}]
_READ_ROLE = [{"bearer": ["read"]}]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": _json({"$ref": f"#/components/schemas/{schema}"}),
    }


def _retry_after(seconds: int) -> dict[str, Any]:
    return {"Retry-After": {"schema": {"type": "integer"}, "description": f"Seconds ({seconds})."}}


def _error(
    description: str,
    *codes: str,
    headers: dict[str, Any] | None = None,
    field: bool = False,
) -> dict[str, Any]:
    """A refusal: an Error whose ``error`` is one of ``codes`` (with ``field`` if asked)."""
    narrowed: dict[str, Any] = {"properties": {"error": {"enum": list(codes)}}}
    if field:
        narrowed["required"] = ["field"]
    response: dict[str, Any] = {
        "description": description,
        "content": _json({"allOf": [{"$ref": "#/components/schemas/Error"}, narrowed]}),
    }
    if headers:
        response["headers"] = headers
    return response


_UNAUTHORIZED = _error(
    "`unauthorized`: no bearer token, or one that is not configured.",
    "unauthorized",
    headers={"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer."}},
)
_FORBIDDEN = _error("`forbidden`: a read-only token (READ_TOKENS) may not ingest.", "forbidden")
_BAD_PARAMETER = _error(
    "`invalid_parameter`: `field` names the path parameter, query parameter or header to"
    " blame; an unknown or repeated query parameter is refused too.",
    "invalid_parameter",
    field=True,
)
_STORE_DOWN = _error(
    "`store_unavailable`: Postgres is unreachable or answered too slowly (QUERY_TIMEOUT_S).",
    "store_unavailable",
    headers=_retry_after(1),
)
_RESEND = "resend the request (resending is idempotent)"
_TOO_LARGE = "`too_large`: the body is over INGEST_MAX_BODY_BYTES."
_INVALID_FIELD = "`invalid_field`: a tick breaks a rule; `field` names the field when one is."
_UNAVAILABLE = (
    "`redis_unavailable`: Redis is unreachable or refuses writes; nothing was stored."
    " `not_durable`: INGEST_DURABILITY=fsync (WAITAOF) or replica (WAIT) was not confirmed in"
    f" time; the ticks may or may not be stored: {_RESEND}."
)
_TICK_ERRORS = {
    "400": _error("`malformed_json`: the body is not JSON.", "malformed_json"),
    "401": _UNAUTHORIZED,
    "403": _FORBIDDEN,
    "413": _error(_TOO_LARGE, "too_large"),
    "415": _error("`unsupported_media_type`: another Content-Type.", "unsupported_media_type"),
    "422": _error(_INVALID_FIELD, "invalid_field"),
    "429": _error(
        "`backpressure`: the flushers' backlog (lag + pending) is over INGEST_MAX_BACKLOG.",
        "backpressure",
        headers=_retry_after(1),
    ),
    "503": _error(_UNAVAILABLE, "redis_unavailable", "not_durable", headers=_retry_after(1)),
}
# A batch can also be too many ticks, not a batch at all, or stored in part.
_BATCH_ERRORS = {
    **_TICK_ERRORS,
    "400": _error(
        "`malformed_json`: the body, or the NDJSON line `index`, is not JSON.", "malformed_json"
    ),
    "413": _error(
        _TOO_LARGE + " `batch_too_large`: more than INGEST_MAX_BATCH ticks.",
        "too_large",
        "batch_too_large",
    ),
    "422": _error(
        _INVALID_FIELD + " `index` names the tick. `invalid_batch`: not an array, or no tick.",
        "invalid_field",
        "invalid_batch",
    ),
    "503": _error(
        _UNAVAILABLE + " `partially_stored`: with STREAM_SHARDS > 1, the ticks of some shards"
        f" were stored and those of the others not; {_RESEND}.",
        "redis_unavailable",
        "not_durable",
        "partially_stored",
        headers=_retry_after(1),
    ),
}


def _time(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description
        + " RFC 3339 with an explicit offset (at most microseconds), or epoch milliseconds"
        " (written as JSON writes an integer: no leading zero).",
        "schema": {"anyOf": [TS_TEXT_SCHEMA, TS_MS_SCHEMA]},
    }


_SYMBOL_PARAMETER = {
    "name": "symbol",
    "in": "path",
    "required": True,
    "description": "URL-encode a `/` in a symbol as `%2F`.",
    "schema": SYMBOL,
}


# What a client can do next with an answer (OpenAPI links, which tools follow).
_EVENTS_AFTER = {
    "operationId": "streamTicks",
    "parameters": {"header.Last-Event-ID": "$response.body#/ids/0"},
    "description": "The ticks accepted after the first of these, pushed as they come.",
}
_AFTER_TICK = {
    "latest": {
        "operationId": "getLatest",
        "parameters": {"symbol": "$request.body#/symbol"},
        "description": "The symbol's newest tick: this one, unless a newer one came.",
    },
    "history": {
        "operationId": "getTicks",
        "parameters": {"symbol": "$request.body#/symbol"},
        "description": "The symbol's committed ticks: this one too once a flusher wrote it.",
    },
    "ranges": {
        "operationId": "getRanges",
        # Not `at` from the tick's ts: a ts written 1714564800000.0 is no query integer.
        "parameters": {"symbol": "$request.body#/symbol"},
        "description": "The symbol's rolled-up windows; `at`: this tick's ts for its own.",
    },
    "events": {
        **_EVENTS_AFTER,
        "parameters": {
            "header.Last-Event-ID": "$response.body#/ids/0",
            "symbols": "$request.body#/symbol",
        },
        "description": "The symbol's ticks accepted after this one, pushed as they come.",
    },
    "chart": {
        "operationId": "getChart",
        "parameters": {"symbol": "$request.body#/symbol"},
        "description": "The symbol's live chart.",
    },
}
_NEXT_PAGE = {
    "operationId": "getTicks",
    "parameters": {
        "symbol": "$request.path.symbol",
        "from": "$request.query.from",
        "to": "$request.query.to",
        "cursor": "$response.body#/next_cursor",
    },
    "description": "The next page of a range (`next_cursor` with the same from/to).",
}


def _ingest_paths() -> dict[str, Any]:
    return {
        "/ingest/tick": {
            "post": {
                "operationId": "postTick",
                "summary": "Ingest one tick.",
                "security": _INGEST_ROLE,
                "requestBody": {
                    "required": True,
                    "content": _json({"$ref": "#/components/schemas/Tick"}),
                },
                "responses": {
                    "200": {
                        **_answer(
                            "In the stream (and confirmed durable in fsync mode).", "Accepted"
                        ),
                        "links": _AFTER_TICK,
                    },
                    **_TICK_ERRORS,
                },
            }
        },
        "/ingest/ticks": {
            "post": {
                "operationId": "postTicks",
                "summary": "Ingest a batch of ticks, all or nothing.",
                "security": _INGEST_ROLE,
                "requestBody": {
                    "required": True,
                    "content": {
                        **_json(
                            {
                                "type": "array",
                                "minItems": 1,
                                "items": {"$ref": "#/components/schemas/Tick"},
                            }
                        ),
                        "application/x-ndjson": {
                            "schema": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"$ref": "#/components/schemas/Tick"},
                                "description": (
                                    "The ticks one per line, each a JSON object (blank lines"
                                    " are skipped); `index` in a refusal counts ticks."
                                ),
                            }
                        },
                    },
                },
                "responses": {
                    "200": {
                        **_answer("Every tick is in the stream.", "Accepted"),
                        "links": {"events": _EVENTS_AFTER},
                    },
                    **_BATCH_ERRORS,
                },
            }
        },
    }


def _read_paths() -> dict[str, Any]:
    return {
        "/ticks/{symbol}/latest": {
            "get": {
                "operationId": "getLatest",
                "summary": "The newest accepted tick of a symbol.",
                "description": (
                    "From Redis's latest-price hash, so a tick shows here as soon as its POST"
                    " is answered; from Postgres when Redis has no entry or is unreachable."
                    " No query parameter."
                ),
                "security": _READ_ROLE,
                "parameters": [_SYMBOL_PARAMETER],
                "responses": {
                    "200": _answer("The tick; `origin` says where it was read.", "Latest"),
                    "401": _UNAUTHORIZED,
                    "404": _error(
                        "`not_found` (`field`: `symbol`): no tick of the symbol in Redis or"
                        " Postgres.",
                        "not_found",
                        field=True,
                    ),
                    "422": _BAD_PARAMETER,
                    "503": _STORE_DOWN,
                },
            }
        },
        "/ticks/{symbol}": {
            "get": {
                "operationId": "getTicks",
                "summary": "Recent history, or a time range in pages.",
                "description": (
                    "Committed ticks (Postgres): a tick shows here once a flusher has written"
                    " it. Without `from` and `to`: the `limit` newest, newest first"
                    " (History). With `from` and/or `to`: those with from <= ts < to, oldest"
                    " first, `limit` per page (RangePage); follow `next`, or pass `next_cursor`"
                    " as `cursor` with the same from/to, until it is null. (`stream` cannot be"
                    " read as a symbol here: /ticks/stream is the event stream.)"
                ),
                "security": _READ_ROLE,
                "parameters": [
                    _SYMBOL_PARAMETER,
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "Ticks per answer (per page of a range).",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": DEFAULT_LIMIT,
                        },
                    },
                    _time("from", "Included; default: the beginning."),
                    _time("to", "Excluded, later than `from`; default: no end."),
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "`next_cursor` of the previous page; only with from/to.",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "History without from/to, a RangePage with them.",
                        "content": _json(
                            {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/History"},
                                    {"$ref": "#/components/schemas/RangePage"},
                                ]
                            }
                        ),
                        "links": {"next": _NEXT_PAGE},
                    },
                    "401": _UNAUTHORIZED,
                    "422": _BAD_PARAMETER,
                    "503": _STORE_DOWN,
                },
            }
        },
        "/ticks/stream": {
            "get": {
                "operationId": "streamTicks",
                "summary": "Ticks pushed as Server-Sent Events, resumable with Last-Event-ID.",
                "description": _STREAM_DESCRIPTION,
                "security": _READ_ROLE,
                "parameters": [
                    {
                        "name": "symbols",
                        "in": "query",
                        "style": "form",
                        "explode": False,
                        "description": (
                            f"1 to {MAX_SYMBOLS} symbols separated by commas; default: every"
                            " symbol (of the shard)."
                        ),
                        "schema": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_SYMBOLS,
                            "items": SYMBOL,
                        },
                    },
                    {
                        "name": "shard",
                        "in": "query",
                        "description": (
                            "With STREAM_SHARDS > 1: follow shard K (0 to STREAM_SHARDS - 1),"
                            " every symbol of it unless `symbols` says otherwise."
                        ),
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": (
                            "Resume right after this event (the `id` of the last `tick`"
                            " received, or a stream id that POST answered). Empty: as if"
                            " absent."
                        ),
                        "schema": {"type": "string", "pattern": LAST_EVENT_ID_PATTERN},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "An event stream; the schema is that of one event.",
                        "content": {
                            "text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}}
                        },
                    },
                    "401": _UNAUTHORIZED,
                    "422": _BAD_PARAMETER,
                    "503": _error(
                        "`too_many_clients`: this process serves SSE_MAX_CLIENTS event"
                        " streams already (Retry-After: 5). `redis_unavailable`: the stream"
                        " cannot be read (Retry-After: 1).",
                        "too_many_clients",
                        "redis_unavailable",
                        headers={
                            "Retry-After": {
                                "schema": {"type": "integer"},
                                "description": "Seconds.",
                            }
                        },
                    ),
                },
            }
        },
        "/ranges/{symbol}": {
            "get": {
                "operationId": "getRanges",
                "summary": "The rolled-up windows (OHLCV) that contain time T.",
                "description": (
                    "One window per width of ROLLUP_WIDTHS that has ticks, narrowest first;"
                    " an empty list when none does. Needs the rollup schema and worker"
                    " (`tickpipe schema apply --rollups`, `tickpipe rollup`)."
                ),
                "security": _READ_ROLE,
                "parameters": [_SYMBOL_PARAMETER, _time("at", "The instant.", required=True)],
                "responses": {
                    "200": _answer("The windows that contain `at`.", "Ranges"),
                    "401": _UNAUTHORIZED,
                    "404": _error(
                        "`rollups_disabled`: the database has no rollup schema.",
                        "rollups_disabled",
                    ),
                    "422": _BAD_PARAMETER,
                    "503": _STORE_DOWN,
                },
            }
        },
    }


_STREAM_DESCRIPTION = """\
The ticks accepted from now on, pushed as soon as Redis holds them (before they \
are in Postgres). They are read from the stream itself, not through the \
flushers' consumer group: listening takes nothing from the flushers.

Events:

- `tick`: one tick; `id` is its stream id (the same id that POST answered), \
`data` a ReadTick.
- `gap`: no `id`; sent first when the ticks after `Last-Event-ID` may have been \
trimmed from the stream (STREAM_RETENTION_S); `data` is a Gap. Reload what is \
missing with `GET /ticks/{symbol}?from=...`.

Comment lines (`: ping`) every SSE_HEARTBEAT_S keep an idle connection open.

Resume: reconnect with `Last-Event-ID` set to the id of the last event \
received (EventSource does it by itself); events go on right after it, with no \
gap and no duplicate. The server ends the stream when it stops, or when the \
client reads so slowly that SSE_CLIENT_BUFFER events wait for it; reconnect \
and resume.

With STREAM_SHARDS > 1 one event stream follows one shard (ids of different \
shards are not comparable): name symbols of one shard, or `shard=K` for every \
symbol of shard K. Symbols on different shards, or neither `symbols` nor \
`shard`, are refused (422, the message names each symbol's shard)."""


def _operations_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up.",
                "responses": {"200": _answer("Up.", "Status")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Redis answers and every shard's stream has the consumer group.",
                "responses": {
                    "200": _answer("Ready.", "Status"),
                    "503": _answer("Not ready.", "Status"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/chart/{symbol}": {
            "get": {
                "operationId": "getChart",
                "summary": "The live chart page of one symbol (HTML; needs no token).",
                "description": "A static page whose script reads `GET /ticks/{symbol}` and"
                " follows `GET /ticks/stream` with the read token given in the URL fragment"
                " (`/chart/AAPL#token=...`), which browsers never send to the server. Served"
                " with a strict Content-Security-Policy. A `token` query parameter is refused:"
                " query strings end up in logs.",
                "parameters": [
                    {
                        "name": "symbol",
                        "in": "path",
                        "required": True,
                        "schema": SYMBOL,
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "422": _error(
                        "`invalid_parameter`: a bad symbol, or any query parameter.",
                        "invalid_parameter",
                        field=True,
                    ),
                },
            }
        },
        "/static/{name}": {
            "get": {
                "operationId": "getAsset",
                "summary": "The chart page's own files (chart.js, chart.css, favicon.svg).",
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": sorted(ASSETS)},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file, with ETag and conditional requests.",
                        "content": {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                            "image/svg+xml": {"schema": {"type": "string"}},
                        },
                    },
                    "404": _error("`not_found`: not one of the page's files.", "not_found"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})}
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tickpipe ingest",
            "version": __version__,
            "description": (
                "Market ticks in, through a Redis Stream, into Postgres; and read back:"
                " the latest tick, history, time ranges, a live event stream, rollups."
                " Every refusal is an Error; its status lists the codes it can carry."
            ),
        },
        "components": {"securitySchemes": {"bearer": _SECURITY}, "schemas": SCHEMAS},
        "paths": {**_ingest_paths(), **_read_paths(), **_operations_paths()},
    }
