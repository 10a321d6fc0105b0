"""The latest-price hash: symbol -> the JSON of its newest tick, written by ingest's script."""

from __future__ import annotations

from decimal import Decimal

import msgspec

from tickpipe.core.ticks import Tick


class LatestPrice(msgspec.Struct, frozen=True):
    """One value of the hash. Field order is the text's order: ``ts`` comes first, so
    the script reads it without decoding the rest (ingest/writer.py)."""

    ts: str
    """Epoch microseconds, as in the stream entry."""
    price: str
    volume: str
    source: str
    id: str
    """The stream id of the entry that set it."""


LATEST_FIELDS: tuple[str, ...] = LatestPrice.__struct_fields__
"""The JSON's keys in the order they are written."""

_decoder = msgspec.json.Decoder(LatestPrice)


def decode_latest(symbol: str, raw: bytes | str) -> Tick:
    """The tick a value of the hash holds for ``symbol``."""
    latest = _decoder.decode(raw)
    price, volume = Decimal(latest.price), Decimal(latest.volume)
    return Tick(symbol, int(latest.ts), price, volume, latest.source)
