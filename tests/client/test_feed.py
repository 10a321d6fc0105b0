"""`tickpipe feed`: files through the client into md_ticks, a summary, and the exit code."""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from flusher.run import run_flusher
from ingest.app import create_app
from tests.client.conftest import stored
from tests.conftest import TEST_TOKEN
from tickpipe.core.settings import Settings

pytestmark = pytest.mark.services

WEI = str(2**256 - 1)


@pytest.fixture
async def ingest_url(settings: Settings, redis: Redis) -> AsyncIterator[str]:
    async with TestServer(create_app(settings)) as server:
        yield str(server.make_url("")).rstrip("/")


async def tickpipe_feed(
    cwd: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tickpipe",
        "feed",
        *args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_csv_backfill_reports_refused_lines_and_keeps_decimals_exact(
    ingest_url: str, settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    (tmp_path / "ticks.csv").write_text(
        "symbol,ts,price,volume,source\n"
        "EURUSD,2026-01-02T10:00:00.000001Z,1.072510000000000001,1500000.50,ecn-1\n"
        f"WEI,1767348000000,{'9' * 78}.{'1' * 18},{WEI},chain\n"
        "EURUSD,2026-01-02T10:00:01Z,-1.5,10,ecn-1\n"
        "\n"
        "EURUSD,2026-01-02T10:00:02Z,1.07\n"
        "EURUSD,2026-01-02T10:00:03Z,1.0726,0,ecn-1\n"
    )
    code, out, err = await tickpipe_feed(
        tmp_path, "ticks.csv", "--url", ingest_url, "--token", TEST_TOKEN
    )
    assert code == 1, err
    assert "5 ticks read from 1 file" in out
    assert "sent      4" in out
    assert "accepted  3" in out
    assert "refused   2" in out
    assert "invalid_field (price): 1 (lines ticks.csv:4)" in out
    assert "e.g. price must be > 0\n" in out
    assert "bad_line: 1 (lines ticks.csv:6)" in out
    assert "expected 5 columns, found 3" in out
    assert "Traceback" not in err

    await run_flusher(settings, burst=True)
    rows = await stored(pg)
    assert sorted(rows.values()) == sorted(
        [
            ("1.072510000000000001", "1500000.50", "ecn-1"),
            (f"{'9' * 78}.{'1' * 18}", WEI, "chain"),
            ("1.0726", "0", "ecn-1"),
        ]
    )


async def test_ndjson_from_stdin_with_url_and_token_from_the_environment(
    ingest_url: str, redis: Redis, settings: Settings, tmp_path: Path
) -> None:
    lines = b"".join(
        b'{"symbol":"BTC-USD","ts":%d,"price":"97000.%d","volume":0.5,"source":"x"}\n'
        % (1767348000000 + i, i)
        for i in range(2500)
    )
    code, out, err = await tickpipe_feed(
        tmp_path,
        "--batch",
        "300",
        stdin=lines,
        env={"TICKPIPE_URL": ingest_url, "TICKPIPE_TOKEN": TEST_TOKEN},
    )
    assert code == 0, out + err
    assert "2,500 ticks read from 1 file" in out
    assert "accepted  2,500" in out
    assert "refused   0" in out
    assert await redis.xlen(settings.stream_name) == 2500


async def test_csv_gz_with_mapped_columns_and_one_source(
    ingest_url: str, redis: Redis, settings: Settings, tmp_path: Path
) -> None:
    with gzip.open(tmp_path / "export.csv.gz", "wt") as out_file:
        out_file.write("time,ticker,px,qty\n1767348000000,AAPL,189.12,100\n")
        out_file.write("1767348000001,AAPL,189.13,200\n")
    code, out, err = await tickpipe_feed(
        tmp_path,
        "export.csv.gz",
        "--columns",
        "symbol=ticker,ts=time,price=px,volume=qty",
        "--source",
        "vendor-x",
        "--url",
        ingest_url,
        "--token",
        TEST_TOKEN,
    )
    assert code == 0, out + err
    entries = await redis.xrange(settings.stream_name)
    assert [(f[b"symbol"], f[b"price"], f[b"source"]) for _, f in entries] == [
        (b"AAPL", b"189.12", b"vendor-x"),
        (b"AAPL", b"189.13", b"vendor-x"),
    ]


async def test_a_file_without_the_needed_columns_says_how_to_map_them(tmp_path: Path) -> None:
    (tmp_path / "odd.csv").write_text("ticker,time,px,qty\nAAPL,1,2,3\n")
    code, _out, err = await tickpipe_feed(
        tmp_path, "odd.csv", "--url", "http://127.0.0.1:9", "--token", "t"
    )
    assert code == 1
    assert "no column 'symbol', 'ts', 'price', 'volume', 'source' in the header" in err
    assert "--columns field=column" in err
    assert "Traceback" not in err
