"""The tick: wire format, validation, and its encoding as a stream entry.

One module owns the contract so that ingest (which writes entries) and the
flusher (which reads them) cannot drift apart. Prices and volumes are
``Decimal`` from the JSON text to the Postgres ``numeric``; no float on the way.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from decimal import Context, Decimal, InvalidOperation
from typing import Annotated, Any

import msgspec

from tickpipe.core.keys import ENTRY_FIELDS

SYMBOL_PATTERN = r"^[A-Za-z0-9._:/-]{1,32}$"
"""The symbol rule as JSON Schema (ECMA) states it, for the OpenAPI document."""
_SYMBOL_RE = r"^[A-Za-z0-9._:/-]{1,32}\Z"
# Python's "$" also matches before a trailing newline: "AAPL\n" would pass it.
MAX_SOURCE_CHARS = 64
"""Characters a source may take (at least one)."""
MAX_DECIMAL_INTEGER_DIGITS = 78
"""Digits before the decimal point a price or volume may carry: 78 hold any uint256,
so on-chain quantities in base units (wei) fit."""
MAX_DECIMAL_SCALE = 18
"""Digits after the decimal point a price or volume may carry."""
MAX_DECIMAL_DIGITS = MAX_DECIMAL_INTEGER_DIGITS + MAX_DECIMAL_SCALE
"""Significant digits a price or volume may carry."""
MAX_DECIMAL_TEXT = MAX_DECIMAL_DIGITS + 32
"""Characters a price or volume may take as written (room for a sign, a point, leading
zeros and an exponent): longer text is refused before it is converted."""
DECIMAL_RULE = (
    f"at most {MAX_DECIMAL_INTEGER_DIGITS} digits before and {MAX_DECIMAL_SCALE} after"
    " the decimal point"
)
"""The digit limits in words, for refusals and the OpenAPI document."""
DECIMAL_TEXT_PATTERN = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
"""A decimal string as JSON Schema (ECMA) states it, for the OpenAPI document."""
DECIMAL_OUT_PATTERN = rf"^\d{{1,{MAX_DECIMAL_INTEGER_DIGITS}}}(\.\d{{1,{MAX_DECIMAL_SCALE}}})?$"
"""A stored price or volume as the read API shows it: plain digits, no sign, no exponent."""
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# ASCII digits only: Decimal() alone would also take " 12 ", "1_000" and other scripts' digits.
_PLAIN_DECIMAL = re.compile(
    rf"\d{{1,{MAX_DECIMAL_INTEGER_DIGITS}}}(?:\.\d{{1,{MAX_DECIMAL_SCALE}}})?", re.ASCII
)
_CANONICAL_JSON_DECIMAL = re.compile(
    rb'(?P<quote>"?)(?P<text>(?:0|[1-9][0-9]{0,%d})(?:\.[0-9]{1,%d})?)(?P=quote)'
    % (MAX_DECIMAL_INTEGER_DIGITS - 1, MAX_DECIMAL_SCALE)
)
# What feeders send almost always: plain digits within the limits, no sign, no
# exponent, no leading zero, as a JSON number or a string. Such text is already the
# stored form, so it skips the careful path's checks (it could fail none of them).
_MAX_JSON_DECIMAL = 6 * MAX_DECIMAL_TEXT + 2
"""The longest JSON value that may hold MAX_DECIMAL_TEXT characters (each as a \\uXXXX escape)."""
_EXPAND = Context(prec=MAX_DECIMAL_DIGITS)
"""Precision enough to expand any exponent within the limits exactly (the default is 28)."""

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_US = dt.timedelta(microseconds=1)
MAX_TS_US = (dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC) - EPOCH) // _ONE_US
SYMBOL = re.compile(_SYMBOL_RE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.(?P<frac>\d+))?(?P<offset>[Zz]|[+-]\d{2}:\d{2})$"
)


# -- the tick as the OpenAPI document states it (ingest/openapi_schemas.py) ------------------
# TickIn's msgspec.Meta carries each field's document form. What msgspec checks while
# decoding is a constraint (pattern, min_length, ...); what validate() checks is stated in
# ``extra_json_schema``, which only the JSON Schema shows: decoding stays as it is.

TIME_RANGE = "from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
TS_TEXT_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "date-time",
    # What parse_ts reads: an explicit offset, at most six fraction digits, a year
    # from 1970 ([0-9], not \d: some regex engines take other scripts' digits for \d).
    "pattern": (
        r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]"
        r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
        r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
    ),
    "description": f"RFC 3339 with an explicit offset, at most microseconds; {TIME_RANGE}.",
}
"""A ts as text, in JSON Schema (the read API's time parameters take the same)."""
TS_MS_SCHEMA: dict[str, Any] = {
    "type": "integer",
    "minimum": 0,
    "maximum": MAX_TS_US // 1000,
    "description": f"Epoch milliseconds; {TIME_RANGE}.",
}
"""A ts as epoch milliseconds, in JSON Schema."""
_DECIMAL_DOC = (
    f"Exact decimal: {DECIMAL_RULE} (an exponent is expanded: 1.5E+3 is 1500), at most"
    f" {MAX_DECIMAL_TEXT} characters as written. Never parsed through a float."
)


def _decimal_meta(rule: str, **bound: int) -> msgspec.Meta:
    """A price or volume in: ``bound`` binds a JSON number (a string's sign is its own)."""
    text = {"type": "string", "pattern": DECIMAL_TEXT_PATTERN, "maxLength": MAX_DECIMAL_TEXT}
    return msgspec.Meta(
        description=rule + _DECIMAL_DOC,
        extra_json_schema={"oneOf": [{"type": "number", **bound}, text]},
    )


class TickIn(msgspec.Struct, forbid_unknown_fields=True):
    """A tick as a feeder sends it."""

    symbol: Annotated[
        str,
        # The same rule in ECMA regex, which has no \Z (and whose $ is the end of the text).
        msgspec.Meta(pattern=_SYMBOL_RE, extra_json_schema={"pattern": SYMBOL_PATTERN}),
    ]
    ts: Annotated[
        int | float | str,
        msgspec.Meta(
            description=(
                "RFC 3339 with an explicit offset and at most microsecond"
                f" precision, or integer epoch milliseconds; {TIME_RANGE} (UTC)."
            ),
            extra_json_schema={"oneOf": [TS_TEXT_SCHEMA, TS_MS_SCHEMA]},
        ),
    ]
    """Epoch milliseconds (a JSON number whose fraction is zero counts: ``1.7e12``) or text."""
    price: Annotated[msgspec.Raw, _decimal_meta("> 0. ", exclusiveMinimum=0)]
    """A JSON number or a decimal string, as written: :func:`decimal_from_json` reads it."""
    volume: Annotated[msgspec.Raw, _decimal_meta(">= 0. ", minimum=0)]
    source: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_SOURCE_CHARS,
            description="No control characters (C0, DEL, C1).",
            extra_json_schema={"pattern": r"^[^\u0000-\u001f\u007f-\u009f]*$"},
        ),
    ]


class Tick(msgspec.Struct, frozen=True):
    """A validated tick. ``ts_us`` is microseconds since the Unix epoch (UTC)."""

    symbol: str
    ts_us: int
    price: Decimal
    volume: Decimal
    source: str

    @property
    def key(self) -> tuple[str, int]:
        """The identity of a tick: a second tick with the same key replaces the first."""
        return (self.symbol, self.ts_us)

    @property
    def ts(self) -> dt.datetime:
        return EPOCH + dt.timedelta(microseconds=self.ts_us)


class TickError(ValueError):
    """A tick failed validation. ``field`` names the offending field, if any."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


def validate(raw: TickIn) -> Tick:
    """Check the rules msgspec cannot express and normalise ``ts``."""
    return Tick(
        symbol=raw.symbol,
        ts_us=parse_ts(raw.ts),
        price=decimal_from_json(raw.price, "price", allow_zero=False),
        volume=decimal_from_json(raw.volume, "volume", allow_zero=True),
        source=check_source(raw.source),
    )


def check_source(source: str) -> str:
    """1-64 characters, no control characters (Postgres text cannot even hold NUL)."""
    if not 1 <= len(source) <= MAX_SOURCE_CHARS:
        raise TickError(f"source must be 1 to {MAX_SOURCE_CHARS} characters", "source")
    if _CONTROL.search(source):
        raise TickError("source must not contain control characters", "source")
    return source


def parse_ts(value: int | float | str) -> int:
    """RFC 3339 with an explicit offset, or integer epoch milliseconds -> epoch microseconds."""
    if isinstance(value, float):
        # JSON (and JSON Schema's "integer") does not tell 1714564800000.0 from
        # 1714564800000; floats hold every integer up to 9999-12-31 in ms exactly.
        if not value.is_integer():
            raise TickError("ts must be integer epoch milliseconds or RFC 3339 text", "ts")
        value = int(value)
    if isinstance(value, int):
        ts_us = value * 1000
    else:
        match = _RFC3339.match(value)
        if match is None:
            raise TickError(
                "ts must be RFC 3339 with an explicit offset (e.g. 2024-05-01T12:00:00.123456Z)"
                " or integer epoch milliseconds",
                "ts",
            )
        frac = match.group("frac")
        if frac is not None and len(frac) > 6:
            raise TickError("ts has more than microsecond precision", "ts")
        try:
            parsed = dt.datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
        except ValueError:
            raise TickError(f"ts is not a valid date and time: {value!r}", "ts") from None
        ts_us = datetime_to_us(parsed)
    if not 0 <= ts_us <= MAX_TS_US:
        raise TickError("ts must lie between 1970-01-01 and 9999-12-31 (UTC)", "ts")
    return ts_us


def datetime_to_us(value: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, no float).

    asyncpg reads the last instant a tick may have, 9999-12-31T23:59:59.999999Z, as
    a naive ``datetime.max`` (its "infinity"): that is the instant it stands for.
    """
    if value == dt.datetime.max:
        return MAX_TS_US
    return (value - EPOCH) // _ONE_US


def decimal_from_json(raw: msgspec.Raw, field: str, *, allow_zero: bool) -> Decimal:
    """A price or volume as the JSON text has it (a number, or a string holding one).

    The text is bounded before anything converts it, so a million digits or
    ``1e999999`` costs nothing but a refusal.
    """
    canonical = _CANONICAL_JSON_DECIMAL.fullmatch(raw)
    if canonical is not None:
        value = Decimal(canonical["text"].decode())
        if allow_zero or value:
            return value
    if len(raw) > _MAX_JSON_DECIMAL:
        raise TickError(_too_long(field), field)
    data = bytes(raw)
    if data.startswith(b'"'):
        text = msgspec.json.decode(data, type=str)
    elif data[:1].isdigit() or data.startswith(b"-"):
        text = data.decode("ascii")  # a JSON number: ASCII by the grammar
    else:
        raise TickError(f"{field} must be a JSON number or a decimal string", field)
    return parse_decimal(text, field, allow_zero=allow_zero)


def parse_decimal(text: str, field: str, *, allow_zero: bool) -> Decimal:
    """Decimal text (``1.10``, ``-2``, ``1.5E+3``) to an exact, checked Decimal."""
    if len(text) > MAX_DECIMAL_TEXT:
        raise TickError(_too_long(field), field)
    if _DECIMAL_TEXT.fullmatch(text) is None:
        if text.strip().lstrip("+-").lower() in ("nan", "snan", "inf", "infinity"):
            raise TickError(f"{field} must be a finite number", field)
        raise TickError(f"{field} is not a decimal number: {text!r}", field)
    try:
        value = Decimal(text)  # at most MAX_DECIMAL_TEXT characters: cheap; nothing expanded
    except InvalidOperation:  # an exponent too large even for Decimal
        raise TickError(_out_of_range(field), field) from None
    return check_decimal(value, field, allow_zero=allow_zero)


def check_decimal(value: Decimal, field: str, *, allow_zero: bool) -> Decimal:
    """Reject NaN, infinities, negative or absurd values; keep the exact digits.

    The digits are counted from the exponent before an exponent is expanded.
    """
    if not value.is_finite():
        raise TickError(f"{field} must be a finite number", field)
    if value < 0 or (value == 0 and not allow_zero):
        raise TickError(f"{field} must be {'>= 0' if allow_zero else '> 0'}", field)
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    scale = max(0, -exponent)
    integer_digits = max(0, len(digits) + exponent)
    if (
        scale > MAX_DECIMAL_SCALE
        or integer_digits > MAX_DECIMAL_INTEGER_DIGITS
        or len(digits) > MAX_DECIMAL_DIGITS
    ):
        raise TickError(_out_of_range(field), field)
    if exponent > 0:
        # 1E+3 -> 1000, so the stream and Postgres see plain digits.
        value = value.quantize(Decimal(1), context=_EXPAND)
    if value == 0:
        value = value.copy_abs()  # -0 is 0 (and "-0" would not be a stored decimal's text)
    return value


def _out_of_range(field: str) -> str:
    return f"{field} is out of range: {DECIMAL_RULE}"


def _too_long(field: str) -> str:
    return f"{field} is too long: at most {MAX_DECIMAL_TEXT} characters ({DECIMAL_RULE})"


def format_ts(ts_us: int) -> str:
    """Epoch microseconds as RFC 3339 in UTC, always with six fraction digits."""
    seconds, us = divmod(ts_us, 1_000_000)
    return f"{_second_text(seconds)}.{us:06d}Z"


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    # Ticks come in time order, many to a second: the calendar is worked out once a second.
    return (EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


def to_json(tick: Tick) -> dict[str, str]:
    """A tick as the read API and the SSE push show it: exact decimals as strings."""
    return {
        "symbol": tick.symbol,
        "ts": format_ts(tick.ts_us),
        "price": format(tick.price, "f"),
        "volume": format(tick.volume, "f"),
        "source": tick.source,
    }


def to_fields(tick: Tick) -> dict[str, str]:
    """The stream entry of a tick: readable strings, so ``XRANGE`` output is useful."""
    return dict(zip(ENTRY_FIELDS, entry_values(tick), strict=True))


def entry_values(tick: Tick) -> tuple[str, str, str, str, str]:
    """The values of :func:`to_fields`, in ENTRY_FIELDS order (ingest's script takes these)."""
    return (
        tick.symbol,
        str(tick.ts_us),
        format(tick.price, "f"),
        format(tick.volume, "f"),
        tick.source,
    )


def from_fields(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Tick:
    """Decode a stream entry written by :func:`to_fields`; raises TickError if it is not one.

    The flusher calls this once per entry, so the common case (bytes from Redis,
    plain decimal digits) takes a short path; every rule is still checked.
    """
    try:
        symbol, ts, price, volume, source = _entry_values(fields)
    except UnicodeDecodeError:
        raise TickError("stream entry is not valid UTF-8") from None
    if SYMBOL.fullmatch(symbol) is None:
        raise TickError("stream entry has an invalid symbol", "symbol")
    try:
        ts_us = int(ts)
    except ValueError:
        raise TickError("stream entry has a malformed ts", "ts") from None
    if not 0 <= ts_us <= MAX_TS_US:
        raise TickError("stream entry ts is out of range", "ts")
    return Tick(
        symbol=symbol,
        ts_us=ts_us,
        price=_stream_decimal(price, "price", allow_zero=False),
        volume=_stream_decimal(volume, "volume", allow_zero=True),
        source=check_source(source),
    )


_BYTE_FIELDS = tuple(name.encode() for name in ENTRY_FIELDS)


def _entry_values(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> tuple[str, ...]:
    """The five values of an entry, in ENTRY_FIELDS order, as text."""
    if len(fields) == 5:
        try:  # the common case: bytes straight from Redis
            return tuple(fields[name].decode() for name in _BYTE_FIELDS)  # type: ignore[index,union-attr]
        except (KeyError, AttributeError):
            pass
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    missing = [name for name in ENTRY_FIELDS if name not in text]
    if missing:
        raise TickError(f"stream entry lacks field {missing[0]!r}", missing[0])
    if len(text) != 5:
        raise TickError(
            f"stream entry has unexpected fields {sorted(set(text) - set(ENTRY_FIELDS))}"
        )
    return tuple(text[name] for name in ENTRY_FIELDS)


def _stream_decimal(text: str, field: str, *, allow_zero: bool) -> Decimal:
    """A decimal as :func:`to_fields` writes it (plain digits), checked cheaply."""
    if _PLAIN_DECIMAL.fullmatch(text) is not None:
        value = Decimal(text)
        if value != 0:
            return value
    return parse_decimal(text, field, allow_zero=allow_zero)  # the careful path


tick_decoder = msgspec.json.Decoder(TickIn)
"""Decodes one JSON tick; reused for every request."""
