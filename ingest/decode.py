"""Request bodies to validated ticks: one JSON tick, a JSON array, or NDJSON.

Batches are all-or-nothing: the first bad tick refuses the whole request, and
the error names its ``index`` (0-based, counting ticks) and ``field``.
"""

from __future__ import annotations

import re

import msgspec

from ingest.errors import ApiError
from tickpipe.core.ticks import Tick, TickError, TickIn, tick_decoder, validate

_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_tick_list_decoder = msgspec.json.Decoder(list[TickIn])

_AT_PATH = re.compile(r" - at `\$(?:\[(?P<index>\d+)\])?(?:\.(?P<field>\w+))?")
_NAMED_FIELD = re.compile(r"(?:missing required|unknown) field `(?P<field>\w+)`")


def decode_tick(body: bytes) -> Tick:
    """``POST /ingest/tick``: exactly one JSON object."""
    return _decode_item(body, None)


def decode_json_array(body: bytes, max_batch: int) -> list[Tick]:
    """``POST /ingest/ticks`` with ``application/json``: a non-empty array of ticks.

    A good batch is decoded in one pass; a bad one again tick by tick, so the
    refusal names the first bad tick's index and field.
    """
    try:
        decoded = _tick_list_decoder.decode(body)
    except msgspec.DecodeError:
        pass
    else:
        _check_count(len(decoded), max_batch)
        return [_validate_item(item, index) for index, item in enumerate(decoded)]
    try:
        items = _raw_list_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid_batch", f"expected a JSON array of ticks: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", str(exc)) from None
    _check_count(len(items), max_batch)
    return [_decode_item(item, index) for index, item in enumerate(items)]


def decode_ndjson(body: bytes, max_batch: int) -> list[Tick]:
    """``POST /ingest/ticks`` with ``application/x-ndjson``: one tick per line."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    _check_count(len(lines), max_batch)
    return [_decode_item(line, index) for index, line in enumerate(lines)]


def _check_count(count: int, max_batch: int) -> None:
    if count == 0:
        raise ApiError(422, "invalid_batch", "the batch holds no ticks")
    if count > max_batch:
        raise ApiError(
            413, "batch_too_large", f"the batch holds {count} ticks; at most {max_batch} allowed"
        )


def _decode_item(raw: bytes | msgspec.Raw, index: int | None) -> Tick:
    try:
        item = tick_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message = str(exc)
        named = _NAMED_FIELD.search(message)
        at = _AT_PATH.search(message)
        field = named["field"] if named else (at["field"] if at else None)
        raise ApiError(422, "invalid_field", message, index=index, field=field) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "malformed_json", str(exc), index=index) from None
    return _validate_item(item, index)


def _validate_item(item: TickIn, index: int | None) -> Tick:
    try:
        return validate(item)
    except TickError as exc:
        raise ApiError(422, "invalid_field", exc.detail, index=index, field=exc.field) from None
