"""Ingest and flushers as real processes for the client's tests, and ticks to send."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tickpipe.lab.processes import Processes


class Services:
    """``tickpipe ingest`` and ``tickpipe flusher run`` processes (tickpipe/lab/processes.py),
    with the test servers in their environment."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.processes = Processes(logs)

    async def ingest(self, port: int, **env: str) -> subprocess.Popen[bytes]:
        """An ingest process on ``port``, once it answers /readyz."""
        proc = self.processes.tickpipe(
            "ingest", ["ingest", "--port", str(port)], {**self.env, **env}
        )
        await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        return proc

    def flusher(self, consumer: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self.processes.tickpipe(
            consumer, ["flusher", "run", "--consumer", consumer, *args], {**self.env, **env}
        )

    def stop_all(self) -> None:
        self.processes.stop_all()


@pytest.fixture
def services(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Services]:
    started = Services(
        {**subprocess_env, "FLUSH_BATCH_SIZE": "500", "FLUSH_INTERVAL_S": "0.05"}, tmp_path
    )
    yield started
    started.stop_all()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready in {timeout_s:.0f} s")
            await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 60.0) -> None:
    """Wait until ``check`` holds; fail after a generous ``timeout_s`` (a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def make_ticks(count: int, *, symbols: int = 11, source: str = "client") -> list[dict[str, object]]:
    """``count`` ticks with distinct keys and decimals that a float would not keep."""
    return [
        {
            "symbol": f"S{i % symbols}",
            "ts": START_MS + i,
            "price": f"{i + 1}.{i % 1000:03d}000000000000001",
            "volume": str(2**256 - 1 - i) if i % 1000 == 0 else f"{i % 500}.5",
            "source": source,
        }
        for i in range(count)
    ]


Row = tuple[str, str, str]


def expected(ticks: list[dict[str, object]]) -> dict[tuple[str, int], Row]:
    return {
        (str(t["symbol"]), int(str(t["ts"]))): (str(t["price"]), str(t["volume"]), str(t["source"]))
        for t in ticks
    }


async def stored(pg: asyncpg.Connection) -> dict[tuple[str, int], Row]:
    """md_ticks as written: decimals as Postgres prints them (exact), ts in epoch ms."""
    records = await pg.fetch(
        "SELECT symbol, (extract(epoch FROM ts) * 1000)::bigint AS ms, price::text,"
        " volume::text, source FROM md_ticks"
    )
    return {(r["symbol"], r["ms"]): (r["price"], r["volume"], r["source"]) for r in records}


async def count_rows(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM md_ticks"))
