from decimal import Decimal

import msgspec
import pytest

from tickpipe.ticks import (
    Tick,
    TickError,
    from_fields,
    parse_ts,
    tick_decoder,
    to_fields,
    validate,
)


def decode(body: bytes) -> Tick:
    return validate(tick_decoder.decode(body))


def test_decimal_numbers_stay_exact() -> None:
    tick = decode(
        b'{"symbol":"EURUSD","ts":1714564800123,"price":1.072510000000000001,'
        b'"volume":"1500000.50","source":"ecn"}'
    )
    assert tick.price == Decimal("1.072510000000000001")
    assert str(tick.price) == "1.072510000000000001"
    assert tick.volume == Decimal("1500000.50")
    assert tick.ts_us == 1714564800123000


@pytest.mark.parametrize(
    ("ts", "expected_us"),
    [
        (0, 0),
        (1714564800123, 1714564800123000),
        ("2024-05-01T12:00:00Z", 1714564800000000),
        ("2024-05-01T12:00:00.123456Z", 1714564800123456),
        ("2024-05-01T14:00:00.5+02:00", 1714564800500000),
        ("2024-05-01t12:00:00z", 1714564800000000),
    ],
)
def test_timestamps(ts: int | str, expected_us: int) -> None:
    assert parse_ts(ts) == expected_us


@pytest.mark.parametrize(
    "ts",
    [
        "2024-05-01T12:00:00",  # naive
        "2024-05-01T12:00:00.1234567Z",  # sub-microsecond
        "2024-05-01",
        "yesterday",
        "2024-13-01T12:00:00Z",
        -1,
        10**18,
    ],
)
def test_bad_timestamps(ts: int | str) -> None:
    with pytest.raises(TickError) as info:
        parse_ts(ts)
    assert info.value.field == "ts"


@pytest.mark.parametrize(
    ("price", "field"),
    [
        ('"NaN"', "price"),
        ('"Infinity"', "price"),
        ('"-1"', "price"),
        ("0", "price"),
        ('"1e-999999"', "price"),
        ('"1e400"', "price"),
        ("1e25", "price"),
    ],
)
def test_bad_prices(price: str, field: str) -> None:
    body = f'{{"symbol":"A","ts":1,"price":{price},"volume":1,"source":"s"}}'.encode()
    with pytest.raises(TickError) as info:
        decode(body)
    assert info.value.field == field


def test_exponent_is_expanded_to_plain_digits() -> None:
    tick = decode(b'{"symbol":"A","ts":1,"price":"1.5E+3","volume":"0","source":"s"}')
    assert to_fields(tick)["price"] == "1500"
    assert to_fields(tick)["volume"] == "0"


@pytest.mark.parametrize(
    "body",
    [
        b'{"symbol":"","ts":1,"price":1,"volume":1,"source":"s"}',
        b'{"symbol":"' + b"A" * 33 + b'","ts":1,"price":1,"volume":1,"source":"s"}',
        b'{"symbol":"A B","ts":1,"price":1,"volume":1,"source":"s"}',
        b'{"symbol":"AAPL\\n","ts":1,"price":1,"volume":1,"source":"s"}',  # found by fuzzing
        b'{"symbol":"A","ts":1,"price":1,"volume":1,"source":""}',
        b'{"symbol":"A","ts":1,"price":1,"volume":1,"source":"' + b"s" * 65 + b'"}',
        b'{"symbol":"A","ts":1,"price":1,"volume":1,"source":"s","extra":1}',
        b'{"symbol":"A","ts":1.5,"price":1,"volume":1,"source":"s"}',
        b'{"symbol":"A","ts":1,"price":true,"volume":1,"source":"s"}',
        b'{"symbol":"A","ts":1,"price":1,"source":"s"}',
    ],
)
def test_schema_violations(body: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(body)


def test_stream_entry_round_trip() -> None:
    tick = Tick("BTC-USD", 1714564800123456, Decimal("64123.10"), Decimal("0.00000001"), "x")
    fields = to_fields(tick)
    assert fields == {
        "symbol": "BTC-USD",
        "ts": "1714564800123456",
        "price": "64123.10",
        "volume": "0.00000001",
        "source": "x",
    }
    encoded = {k.encode(): v.encode() for k, v in fields.items()}
    assert from_fields(encoded) == tick


@pytest.mark.parametrize(
    "fields",
    [
        {b"symbol": b"A"},
        {b"symbol": b"A", b"ts": b"x", b"price": b"1", b"volume": b"1", b"source": b"s"},
        {b"symbol": b"A", b"ts": b"1", b"price": b"NaN", b"volume": b"1", b"source": b"s"},
        {b"symbol": b"A", b"ts": b"1", b"price": b"1", b"volume": b"1", b"source": b"s", b"x": b""},
    ],
)
def test_undecodable_entries(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(TickError):
        from_fields(fields)
