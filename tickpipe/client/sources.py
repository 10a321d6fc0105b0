"""Ticks read from files for ``tickpipe feed``: CSV with a header, or NDJSON; stdin as ``-``.

Prices and volumes go to ingest as the file's text (a JSON string): never a float.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Literal, NamedTuple, cast

import msgspec

Format = Literal["csv", "ndjson"]
FIELDS = ("symbol", "ts", "price", "volume", "source")
CHUNK = 1000
"""Lines read between two hand-overs to the client."""


class Line(NamedTuple):
    """Where a tick came from: the file (``-`` for stdin) and its line number (from 1)."""

    file: str
    number: int

    def __str__(self) -> str:
        return f"{self.file}:{self.number}"


class SourceError(ValueError):
    """A file that cannot be read as ticks at all (no header, unknown columns...)."""


@dataclasses.dataclass
class Chunk:
    """Up to CHUNK lines: the ticks to send (JSON) with their lines, and lines refused here."""

    ticks: list[bytes] = dataclasses.field(default_factory=list)
    lines: list[Line] = dataclasses.field(default_factory=list)
    bad: list[tuple[Line, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ticks) + len(self.bad)


class _CsvTick(msgspec.Struct):
    symbol: str
    ts: int | str
    price: str
    volume: str
    source: str


_encode = msgspec.json.Encoder().encode


def open_binary(path: str) -> IO[bytes]:
    """The file at ``path`` (``-``: stdin), decompressed if it ends in ``.gz``."""
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def detect_format(path: str, head: bytes) -> Format:
    """By the name (.csv, .ndjson, .jsonl), else by the first character: ``{`` is NDJSON."""
    name = path.removesuffix(".gz").lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".ndjson", ".jsonl", ".json")):
        return "ndjson"
    return "ndjson" if head.lstrip().startswith(b"{") else "csv"


def count_lines(path: str) -> int | None:
    """Lines in the file (for the progress bar's ETA); None for stdin."""
    if path == "-":
        return None
    count, last = 0, b"\n"
    with open_binary(path) as stream:
        while block := stream.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def read_ticks(
    stream: IO[bytes],
    name: str,
    fmt: Format,
    *,
    columns: Mapping[str, str] | None = None,
    source: str | None = None,
) -> Iterator[Chunk]:
    """The file's ticks in chunks; raises SourceError if it cannot be read at all."""
    if fmt == "ndjson":
        return _read_ndjson(stream, name)
    return _read_csv(stream, name, columns or {}, source)


def _read_ndjson(stream: IO[bytes], name: str) -> Iterator[Chunk]:
    chunk = Chunk()
    for number, raw in enumerate(stream, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(b"{"):
            chunk.ticks.append(line)
            chunk.lines.append(Line(name, number))
        else:
            chunk.bad.append((Line(name, number), "not a JSON object"))
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = Chunk()
    if len(chunk):
        yield chunk


def _read_csv(
    stream: IO[bytes], name: str, columns: Mapping[str, str], source: str | None
) -> Iterator[Chunk]:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    reader = csv.reader(text)
    header = [column.strip() for column in next(reader, [])]
    if not header:
        raise SourceError(f"{name}: empty, expected a header line ({','.join(FIELDS)})")
    wanted = {field: columns.get(field, field) for field in FIELDS}
    if source is not None and "source" not in columns and "source" not in header:
        del wanted["source"]
    missing = [column for column in wanted.values() if column not in header]
    if missing:
        hint = " (or give every tick one with --source)" if wanted.get("source") in missing else ""
        raise SourceError(
            f"{name}: no column {', '.join(map(repr, missing))} in the header"
            f" ({', '.join(header)}); map columns with --columns field=column{hint}"
        )
    at = {field: header.index(column) for field, column in wanted.items()}
    i_symbol, i_ts, i_price, i_volume = at["symbol"], at["ts"], at["price"], at["volume"]
    i_source = at.get("source")
    needed = max(at.values()) + 1
    chunk = Chunk()
    for row in reader:
        line = Line(name, reader.line_num)
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < needed:
            chunk.bad.append((line, f"expected {len(header)} columns, found {len(row)}"))
        else:
            ts = row[i_ts].strip()
            tick = _CsvTick(
                row[i_symbol].strip(),
                int(ts) if ts.isascii() and ts.isdigit() else ts,
                row[i_price].strip(),
                row[i_volume].strip(),
                row[i_source].strip() if i_source is not None else (source or ""),
            )
            chunk.ticks.append(_encode(tick))
            chunk.lines.append(line)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = Chunk()
    if len(chunk):
        yield chunk


def parse_columns(text: str) -> dict[str, str]:
    """``--columns symbol=ticker,price=px``: tick field -> CSV column name."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        if not sep or field.strip() not in FIELDS or not column.strip():
            raise ValueError(
                f"{part!r}: expected field=column with a field among {', '.join(FIELDS)}"
            )
        mapping[field.strip()] = column.strip()
    return mapping


def data_lines(path: str, fmt: Format) -> int | None:
    """Lines holding ticks (the header excluded), for the progress bar's total."""
    lines = count_lines(path)
    if lines is None:
        return None
    return max(0, lines - 1) if fmt == "csv" else lines


def exists(path: str) -> bool:
    return path == "-" or Path(path).is_file()
