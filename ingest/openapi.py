"""The OpenAPI 3.1 description served at ``GET /openapi.json``.

Written by hand so that it says exactly what the service does; a test checks
real responses against it.
"""

from __future__ import annotations

from typing import Any

from tickpipe import __version__
from tickpipe.ticks import MAX_DECIMAL_INTEGER_DIGITS, MAX_DECIMAL_SCALE, SYMBOL_PATTERN

_DECIMAL_RULE = (
    f"Exact decimal: at most {MAX_DECIMAL_INTEGER_DIGITS} digits before and"
    f" {MAX_DECIMAL_SCALE} after the point. Never parsed through a float."
)
_DECIMAL: dict[str, Any] = {
    "description": _DECIMAL_RULE,
    "oneOf": [
        {"type": "number"},
        {"type": "string", "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"},
    ],
}

_ERROR_CODES = [
    "malformed_json",
    "unauthorized",
    "too_large",
    "batch_too_large",
    "unsupported_media_type",
    "invalid_field",
    "invalid_batch",
    "backpressure",
    "redis_unavailable",
    "not_durable",
    "not_found",
    "method_not_allowed",
]


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
_INGEST_ERRORS = {
    "400": _error("Malformed JSON."),
    "401": _error(
        "Missing or invalid bearer token.",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    "413": _error("Body larger than INGEST_MAX_BODY_BYTES or batch above INGEST_MAX_BATCH."),
    "415": _error("Unsupported Content-Type."),
    "422": _error("A field breaks a rule; `field` (and `index` in a batch) name it."),
    "429": _error("Backpressure: the flushers' backlog is above INGEST_MAX_BACKLOG.", _RETRY_AFTER),
    "503": _error("Redis unavailable, or (fsync mode) the AOF fsync not confirmed.", _RETRY_AFTER),
}

_ACCEPTED = {
    "description": "Stored in the stream (and, in fsync mode, fsynced to the AOF).",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tickpipe ingest",
            "version": __version__,
            "description": "Market ticks in, through a Redis Stream, into Postgres.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Tick": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["symbol", "ts", "price", "volume", "source"],
                    "properties": {
                        "symbol": {"type": "string", "pattern": SYMBOL_PATTERN},
                        "ts": {
                            "description": (
                                "RFC 3339 with an explicit offset and at most microsecond"
                                " precision, or integer epoch milliseconds."
                            ),
                            "oneOf": [
                                {"type": "string", "format": "date-time"},
                                {"type": "integer", "minimum": 0},
                            ],
                        },
                        "price": {**_DECIMAL, "description": "> 0. " + _DECIMAL_RULE},
                        "volume": {**_DECIMAL, "description": ">= 0. " + _DECIMAL_RULE},
                        "source": {"type": "string", "minLength": 1, "maxLength": 64},
                    },
                },
                "Accepted": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["accepted", "ids"],
                    "properties": {
                        "accepted": {"type": "integer", "minimum": 1},
                        "ids": {
                            "type": "array",
                            "items": {"type": "string", "pattern": r"^\d+-\d+$"},
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string", "enum": _ERROR_CODES},
                        "detail": {"type": "string"},
                        "index": {"type": "integer", "minimum": 0},
                        "field": {"type": "string"},
                    },
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
            },
        },
        "paths": {
            "/ingest/tick": {
                "post": {
                    "summary": "Ingest one tick.",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Tick"}}
                        },
                    },
                    "responses": {"200": _ACCEPTED, **_INGEST_ERRORS},
                }
            },
            "/ingest/ticks": {
                "post": {
                    "summary": "Ingest a batch of ticks, all or nothing.",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"$ref": "#/components/schemas/Tick"},
                                }
                            },
                            "application/x-ndjson": {
                                "schema": {
                                    "type": "string",
                                    "description": "One Tick object per line.",
                                }
                            },
                        },
                    },
                    "responses": {"200": _ACCEPTED, **_INGEST_ERRORS},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is up.",
                    "responses": {"200": _status("Up.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Redis answers and the consumer group exists.",
                    "responses": {"200": _status("Ready."), "503": _status("Not ready.")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }


def _status(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
    }
