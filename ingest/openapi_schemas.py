"""The schemas of the OpenAPI document: what goes in, what comes out, what is refused.

Kept apart from the paths (ingest/openapi.py) so each reads on its own; the
test in tests/ingest/test_contract.py checks real answers against both.
"""

from __future__ import annotations

from typing import Any

from tickpipe.core.ticks import (
    DECIMAL_OUT_PATTERN,
    DECIMAL_RULE,
    DECIMAL_TEXT_PATTERN,
    MAX_DECIMAL_SCALE,
    MAX_DECIMAL_TEXT,
    MAX_TS_US,
    SYMBOL_PATTERN,
)

_DECIMAL_RULE = (
    f"Exact decimal: {DECIMAL_RULE} (an exponent is expanded: 1.5E+3 is 1500), at most"
    f" {MAX_DECIMAL_TEXT} characters as written. Never parsed through a float."
)
_DECIMAL_IN: dict[str, Any] = {
    "description": _DECIMAL_RULE,
    "oneOf": [
        {"type": "number"},
        {"type": "string", "pattern": DECIMAL_TEXT_PATTERN, "maxLength": MAX_DECIMAL_TEXT},
    ],
}


def _decimal_in(rule: str, **bound: int) -> dict[str, Any]:
    """A price or volume in: ``bound`` binds a JSON number (a string's sign is its own)."""
    number, text = _DECIMAL_IN["oneOf"]
    return {**_DECIMAL_IN, "description": rule + _DECIMAL_RULE, "oneOf": [number | bound, text]}


_DECIMAL_OUT: dict[str, Any] = {
    "type": "string",
    "pattern": DECIMAL_OUT_PATTERN,
    "description": "The exact decimal as stored, digit for digit, as a string (no exponent).",
}
_SUM_OUT: dict[str, Any] = {
    **_DECIMAL_OUT,
    "pattern": rf"^\d+(\.\d{{1,{MAX_DECIMAL_SCALE}}})?$",  # a sum may outgrow one value's digits
}
TIME_OUT: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
    "description": "RFC 3339 in UTC, always with six fraction digits.",
}
TIME_RANGE = "from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
TIME_TEXT_IN: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    # What the service reads: an explicit offset, at most six fraction digits, a year
    # from 1970 ([0-9], not \d: some regex engines take other scripts' digits for \d).
    "pattern": (
        r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]"
        r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
        r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
    ),
    "description": f"RFC 3339 with an explicit offset, at most microseconds; {TIME_RANGE}.",
}
EPOCH_MS_IN: dict[str, Any] = {
    "type": "integer",
    "minimum": 0,
    "maximum": MAX_TS_US // 1000,
    "description": f"Epoch milliseconds; {TIME_RANGE}.",
}
STREAM_ID: dict[str, Any] = {"type": "string", "pattern": r"^\d+-\d+$"}
SYMBOL: dict[str, Any] = {"type": "string", "pattern": SYMBOL_PATTERN}

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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], *optional: str) -> dict[str, Any]:
    """A closed object: every property required but the ``optional`` ones."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [name for name in properties if name not in optional],
        "properties": properties,
    }


_READ_TICK = {
    "symbol": SYMBOL,
    "ts": TIME_OUT,
    "price": _DECIMAL_OUT,
    "volume": _DECIMAL_OUT,
    "source": {"type": "string"},
}


def _json_event(name: str, data: str, *, with_id: bool) -> dict[str, Any]:
    """One SSE event whose ``data`` line holds a JSON document of schema ``data``."""
    properties: dict[str, Any] = {"event": {"const": name}}
    if with_id:
        properties["id"] = {**STREAM_ID, "description": "The tick's stream id."}
    properties["data"] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": _ref(data),
    }
    return _object(properties)


SCHEMAS: dict[str, Any] = {
    "Tick": {
        "description": "A tick as a feeder sends it.",
        **_object(
            {
                "symbol": SYMBOL,
                "ts": {
                    "description": (
                        "RFC 3339 with an explicit offset and at most microsecond"
                        f" precision, or integer epoch milliseconds; {TIME_RANGE} (UTC)."
                    ),
                    "oneOf": [TIME_TEXT_IN, EPOCH_MS_IN],
                },
                "price": _decimal_in("> 0. ", exclusiveMinimum=0),
                "volume": _decimal_in(">= 0. ", minimum=0),
                "source": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 64,
                    "pattern": r"^[^\u0000-\u001f\u007f-\u009f]*$",
                    "description": "No control characters (C0, DEL, C1).",
                },
            }
        ),
    },
    "Accepted": _object(
        {
            "accepted": {"type": "integer", "minimum": 1},
            "ids": {
                "type": "array",
                "items": STREAM_ID,
                "description": "Stream ids, in the order of the ticks sent.",
            },
        }
    ),
    "ReadTick": {
        "description": "A tick as every read route and the event stream show it.",
        **_object(_READ_TICK),
    },
    "Latest": {
        "description": "The newest tick of a symbol, and where it was read.",
        **_object(
            {
                **_READ_TICK,
                "origin": {
                    "enum": ["stream", "store"],
                    "description": (
                        "`stream`: the latest-price hash, written in the same step as the"
                        " stream entry (the tick may not be in Postgres yet). `store`:"
                        " Postgres, when Redis has no entry for the symbol or is unreachable."
                    ),
                },
            }
        ),
    },
    "History": {
        "description": "The newest committed ticks, newest first.",
        **_object(
            {
                "symbol": SYMBOL,
                "order": {"const": "newest_first"},
                "ticks": {"type": "array", "items": _ref("ReadTick")},
            }
        ),
    },
    "RangePage": {
        "description": (
            "One page of the committed ticks in [from, to), oldest first. `next` and"
            " `next_cursor` are null on the last page."
        ),
        **_object(
            {
                "symbol": SYMBOL,
                "order": {"const": "oldest_first"},
                "ticks": {"type": "array", "items": _ref("ReadTick")},
                "next": {
                    "type": ["string", "null"],
                    "description": "The next page: this path and query with `cursor` set.",
                },
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Opaque; pass it as `cursor` with the same from/to.",
                },
            }
        ),
    },
    "Ranges": {
        "description": "The rolled-up windows that contain `at`, one per width, narrowest first.",
        **_object(
            {
                "symbol": SYMBOL,
                "at": TIME_OUT,
                "ranges": {"type": "array", "items": _ref("Range")},
            }
        ),
    },
    "Range": {
        "description": "OHLCV of the committed ticks with start <= ts < end.",
        **_object(
            {
                "width": {
                    "type": "string",
                    "pattern": r"^\d+[smhd]$",
                    "description": "One of ROLLUP_WIDTHS, in its shortest spelling (60s is 1m).",
                },
                "start": TIME_OUT,
                "end": TIME_OUT,
                "open": {**_DECIMAL_OUT, "description": "The price at the earliest ts."},
                "high": _DECIMAL_OUT,
                "low": _DECIMAL_OUT,
                "close": {**_DECIMAL_OUT, "description": "The price at the latest ts."},
                "volume": {**_SUM_OUT, "description": "The sum of the volumes."},
                "count": {"type": "integer", "minimum": 1},
            }
        ),
    },
    "Gap": {
        "description": "Ticks after `after` may have been trimmed from the stream.",
        **_object(
            {
                "after": {**STREAM_ID, "description": "The Last-Event-ID the client sent."},
                "resumes_at": {
                    "description": "The first id still in the stream (empty if none is).",
                    "oneOf": [STREAM_ID, {"const": ""}],
                },
                "detail": {"type": "string"},
            }
        ),
    },
    "Event": {
        "description": (
            "One event of GET /ticks/stream, as its SSE fields (`event`, `id`, `data`);"
            " `data` is one line of JSON."
        ),
        "oneOf": [
            _json_event("tick", "ReadTick", with_id=True),
            _json_event("gap", "Gap", with_id=False),
        ],
    },
    "Error": {
        "description": "Every refusal. `index` (0-based) names a tick of a batch.",
        **_object(
            {
                "error": {"type": "string", "enum": ERROR_CODES},
                "detail": {
                    "type": "string",
                    "description": "What was wrong and what to do, for a person.",
                },
                "index": {"type": "integer", "minimum": 0},
                "field": {
                    "type": "string",
                    "description": "The tick field, parameter or header to blame.",
                },
            },
            "index",
            "field",
        ),
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string"},
            "detail": {"type": "string"},
            "pid": {"type": "integer"},
        },
    },
}
