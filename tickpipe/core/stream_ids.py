"""Redis stream ids, ``<ms>-<seq>``: parse, compare, and the time an entry was added."""

from __future__ import annotations

StreamId = tuple[int, int]
"""A stream id as a pair that compares the way Redis orders entries."""


def is_id(raw: str) -> bool:
    """A complete stream id, ``<ms>-<seq>`` (a bare ``<ms>`` would name a range)."""
    ms, _, seq = raw.partition("-")
    return ms.isdigit() and seq.isdigit()


def parse_id(raw: str) -> StreamId:
    """``<ms>-<seq>`` as a comparable pair; ValueError if it is not a stream id."""
    ms, sep, seq = raw.partition("-")
    if not (ms.isdigit() and seq.isdigit() and sep):
        raise ValueError(raw)
    return int(ms), int(seq)


def id_key(raw: str) -> StreamId:
    """A sort key for an id Redis gave (a bare ``<ms>`` counts as ``<ms>-0``)."""
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


def id_time_ms(raw: str) -> int:
    """The wall-clock time (epoch milliseconds) at which Redis added the entry."""
    return int(raw.split("-", 1)[0])
