"""The schemas of the OpenAPI document: what goes in, what comes out, what is refused.

Kept apart from the paths (ingest/openapi.py) so each reads on its own; the
test in tests/ingest/test_contract.py checks real answers against both. What
goes in (``Tick``) and every refusal (``Error``) are generated from the msgspec
models that decode and encode them, so the document cannot drift from them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec.inspect import Metadata, StructType

from ingest.errors import ErrorBody
from tickpipe.core.ticks import (
    DECIMAL_OUT_PATTERN,
    MAX_DECIMAL_SCALE,
    SYMBOL_PATTERN,
    TickIn,
)


def model_schema(model: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON Schema of a msgspec model, as a component of the document.

    A field's ``extra_json_schema`` states its documented form (what custom
    validation checks beyond the decoder) and wins over what msgspec derives
    from the decoding type: a ``oneOf`` there replaces the decoder's wider union.
    """
    schema: dict[str, Any] = msgspec.json.schema_components([model])[1][model.__name__]
    del schema["title"]  # the component's name says it
    info = msgspec.inspect.type_info(model)
    assert isinstance(info, StructType)
    for field in info.fields:
        stated = field.type.extra_json_schema if isinstance(field.type, Metadata) else None
        if stated:
            part = schema["properties"][field.encode_name]
            part.update(stated)
            if "oneOf" in stated:
                part.pop("anyOf", None)
    return schema


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
STREAM_ID: dict[str, Any] = {"type": "string", "pattern": r"^\d+-\d+$"}
SYMBOL: dict[str, Any] = {"type": "string", "pattern": SYMBOL_PATTERN}


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
    "Tick": model_schema(TickIn),
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
    "Error": model_schema(ErrorBody),
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
