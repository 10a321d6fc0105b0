import datetime as dt
import random
import time
from decimal import Decimal

import msgspec
import pytest

from tickpipe.core.ticks import (
    EPOCH,
    MAX_TS_US,
    Tick,
    TickError,
    datetime_to_us,
    decimal_from_json,
    format_ts,
    from_fields,
    parse_decimal,
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
        ("1e78", "price"),
        ('"1E+999999999"', "price"),
        ("1e9999999999999999999999", "price"),
        ("1" * 79, "price"),
        ('"' + "1" * 79 + '"', "price"),
        ("0." + "1" * 19, "price"),
        ('"1.0000000000000000000"', "price"),  # 19 fraction digits, if zeros
        ("1e-19", "price"),
        ("true", "price"),
        ("null", "price"),
        ("[1]", "price"),
        ('" 12 "', "price"),
        ('"1_000"', "price"),
        ('"1,5"', "price"),
        ('"\u0661"', "price"),  # ARABIC-INDIC DIGIT ONE: a digit, but not one of ours
        ('""', "price"),
    ],
)
def test_bad_prices(price: str, field: str) -> None:
    body = f'{{"symbol":"A","ts":1,"price":{price},"volume":1,"source":"s"}}'.encode()
    with pytest.raises(TickError) as info:
        decode(body)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("wire", "stored"),
    [
        ('"1.5E+3"', "1500"),
        ("1.5e3", "1500"),
        ("12345678901234567890123456789e+49", "1234567890123456789012345678900000" + "0" * 44),
        (
            '"1.23456789012345678901234567890123456789E+77"',
            "123456789012345678901234567890123456789" + "0" * 39,
        ),
        ("1E+77", "1" + "0" * 77),
        ('"1e-18"', "0.000000000000000001"),
        ("0.5e-17", "0.000000000000000005"),
        ('"0e5"', "0"),
        ('"-0.00"', "0.00"),
        ('"+7"', "7"),
        ('".5"', "0.5"),
        ('"\u0031\u0032"', "12"),
    ],
)
def test_exponents_within_range_are_expanded_exactly(wire: str, stored: str) -> None:
    tick = decode(f'{{"symbol":"A","ts":1,"price":1,"volume":{wire},"source":"s"}}'.encode())
    assert to_fields(tick)["volume"] == stored
    assert tick.volume == Decimal(stored)


UINT256_MAX = str(2**256 - 1)  # 78 digits


@pytest.mark.parametrize("as_number", [True, False])
def test_78_integer_and_18_fraction_digits_are_exact(as_number: bool) -> None:
    price = "9" * 78 + "." + "1" * 18
    quote = "" if as_number else '"'
    tick = decode(
        f'{{"symbol":"ETH","ts":1,"price":{quote}{price}{quote},'
        f'"volume":{quote}{UINT256_MAX}{quote},"source":"s"}}'.encode()
    )
    assert to_fields(tick)["price"] == price
    assert to_fields(tick)["volume"] == UINT256_MAX
    encoded = {k.encode(): v.encode() for k, v in to_fields(tick).items()}
    assert from_fields(encoded) == tick
    assert str(from_fields(encoded).volume) == UINT256_MAX


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "1" * 79,
            "price is out of range: at most 78 digits before and 18 after the decimal point",
        ),
        ("1e999999", "price is out of range: at most 78 digits before and 18 after"),
        ('"' + "1" * 1_000_000 + '"', "price is too long: at most 128 characters"),
        ("1" * 1_000_000, "price is too long: at most 128 characters"),
        ("0." + "0" * 1_000_000 + "1", "price is too long: at most 128 characters"),
    ],
)
def test_refusals_say_what_the_limit_is_and_are_quick(value: str, expected: str) -> None:
    body = f'{{"symbol":"A","ts":1,"price":{value},"volume":1,"source":"s"}}'.encode()
    started = time.perf_counter()
    with pytest.raises(TickError) as info:
        decode(body)
    assert time.perf_counter() - started < 0.5
    assert info.value.detail.startswith(expected)
    assert info.value.field == "price"


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
        b'{"symbol":"A","ts":1,"price":1,"source":"s"}',
    ],
)
def test_schema_violations(body: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(body)


@pytest.mark.parametrize(
    ("ts", "expected_us"),
    [(b"1714564800000.0", 1714564800000000), (b"1.7145648e12", 1714564800000000), (b"-0.0", 0)],
)
def test_a_ts_number_with_a_zero_fraction_is_an_integer(ts: bytes, expected_us: int) -> None:
    # As JSON Schema's "integer" (and the OpenAPI document) counts.
    body = b'{"symbol":"A","ts":' + ts + b',"price":1,"volume":1,"source":"s"}'
    assert decode(body).ts_us == expected_us


@pytest.mark.parametrize("ts", [b"1.5", b"1714564800000.25", b"-1.0", b"1e300"])
def test_a_ts_number_with_a_fraction_or_out_of_range_is_refused(ts: bytes) -> None:
    body = b'{"symbol":"A","ts":' + ts + b',"price":1,"volume":1,"source":"s"}'
    with pytest.raises(TickError) as info:
        decode(body)
    assert info.value.field == "ts"


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
        {b"symbol": b"A", b"ts": b"1", b"price": b"1" * 79, b"volume": b"1", b"source": b"s"},
        {b"symbol": b"A", b"ts": b"1", b"price": b"1" * 10**6, b"volume": b"1", b"source": b"s"},
        {b"symbol": b"A", b"ts": b"1", b"price": b"1e999999", b"volume": b"1", b"source": b"s"},
        {
            b"symbol": b"A",
            b"ts": b"1",
            b"price": "\u0661".encode(),
            b"volume": b"1",
            b"source": b"s",
        },
        {b"symbol": b"A", b"ts": b"1", b"price": b"1", b"volume": b"-1", b"source": b"s"},
        {b"symbol": b"A", b"ts": b"1", b"price": b"\xff", b"volume": b"1", b"source": b"s"},
    ],
)
def test_undecodable_entries(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(TickError):
        from_fields(fields)


def _careful(text: str, allow_zero: bool) -> str:
    """The careful path's answer: the stored text, or the refusal."""
    try:
        return format(parse_decimal(text, "price", allow_zero=allow_zero), "f")
    except TickError as exc:
        return f"refused: {exc.detail}"


@pytest.mark.parametrize("allow_zero", [True, False])
def test_the_fast_path_for_plain_decimals_answers_as_the_careful_one(allow_zero: bool) -> None:
    rng = random.Random(15)
    texts = [
        "0", "0.0", "0.5", "00.5", "05", "1", "10", "1.", ".5", "1.50", "-1", "-0", "+1",
        "1e3", "9" * 78, "9" * 79, "1." + "0" * 18, "1." + "0" * 19, "1" * 78 + "." + "9" * 18,
    ]  # fmt: skip
    for _ in range(2000):
        whole = rng.choice(["0", str(rng.randrange(10 ** rng.randrange(1, 80)))])
        fraction = "".join(rng.choice("0123456789") for _ in range(rng.randrange(0, 20)))
        texts.append(whole + ("." + fraction if fraction or rng.random() < 0.1 else ""))
    for text in texts:
        expected = _careful(text, allow_zero)
        as_string = msgspec.json.encode(text)
        wires = [as_string] + ([text.encode()] if text[:1].isdigit() and text[-1:] != "." else [])
        for wire in wires:
            try:
                got = format(
                    decimal_from_json(msgspec.Raw(wire), "price", allow_zero=allow_zero), "f"
                )
            except TickError as exc:
                got = f"refused: {exc.detail}"
            assert got == expected, wire


def test_format_ts_is_rfc3339_utc_with_microseconds_over_the_whole_range() -> None:
    rng = random.Random(2026)
    stamps = [0, 1, 999_999, 1_000_000, MAX_TS_US] + [
        rng.randint(0, MAX_TS_US) for _ in range(20_000)
    ]
    for ts_us in stamps:
        moment = EPOCH + dt.timedelta(microseconds=ts_us)
        assert format_ts(ts_us) == moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), ts_us


def test_datetime_to_us_reads_asyncpgs_last_instant_as_that_instant() -> None:
    # asyncpg returns 9999-12-31T23:59:59.999999Z read from Postgres as naive datetime.max.
    assert datetime_to_us(dt.datetime.max) == MAX_TS_US
    assert datetime_to_us(EPOCH + dt.timedelta(microseconds=MAX_TS_US)) == MAX_TS_US
    with pytest.raises(TypeError):
        datetime_to_us(dt.datetime(2024, 1, 1))  # any other naive datetime is refused
