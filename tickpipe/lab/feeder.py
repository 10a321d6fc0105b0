"""A small feeder: POSTs generated ticks to ingest and records which were accepted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from decimal import Decimal

import aiohttp
import msgspec

from tickpipe.core.ticks import Tick

_json = msgspec.json.Encoder(decimal_format="string")


@dataclasses.dataclass
class FeedResult:
    accepted: list[Tick] = dataclasses.field(default_factory=list)
    rejected: dict[int, int] = dataclasses.field(default_factory=dict)
    """HTTP status -> count of ticks refused with it."""
    errors: int = 0
    """Requests that got no HTTP answer at all (connection refused, reset)."""


class NotReady(RuntimeError):
    """A service did not answer 200 in time."""


async def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; NotReady after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise NotReady(f"{url} did not become ready in {timeout_s:.0f} s")


def generate_ticks(
    count: int,
    symbols: Sequence[str],
    *,
    seed: int = 0,
    start_us: int | None = None,
    source: str = "demo-feeder",
) -> list[Tick]:
    """``count`` ticks spread over ``symbols``, each (symbol, ts) unique, prices exact."""
    rng = random.Random(seed)
    start = start_us if start_us is not None else int(time.time() * 1_000_000)
    prices = {s: Decimal(rng.randint(1000, 50000)) / 100 for s in symbols}
    ticks = []
    for i in range(count):
        symbol = symbols[i % len(symbols)]
        step = Decimal(rng.randint(-50, 50)) / 10000
        prices[symbol] = max(Decimal("0.0001"), prices[symbol] + step)
        ticks.append(
            Tick(
                symbol=symbol,
                ts_us=start + i * 137,
                price=prices[symbol],
                volume=Decimal(rng.randint(1, 5000)),
                source=source,
            )
        )
    return ticks


def tick_json(tick: Tick) -> bytes:
    """The JSON a feeder sends for ``tick`` (ts in RFC 3339, decimals as strings)."""
    return _json.encode(
        {
            "symbol": tick.symbol,
            "ts": tick.ts.isoformat(),
            "price": tick.price,
            "volume": tick.volume,
            "source": tick.source,
        }
    )


async def feed(
    base_url: str,
    token: str,
    ticks: Sequence[Tick],
    *,
    concurrency: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> FeedResult:
    """POST every tick to ``/ingest/tick`` with ``concurrency`` requests in flight."""
    result = FeedResult()
    queue: asyncio.Queue[Tick] = asyncio.Queue()
    for tick in ticks:
        queue.put_nowait(tick)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            tick = queue.get_nowait()
            try:
                async with session.post(
                    f"{base_url}/ingest/tick", data=tick_json(tick), headers=headers
                ) as response:
                    await response.read()
                    if response.status == 200:
                        result.accepted.append(tick)
                    else:
                        result.rejected[response.status] = (
                            result.rejected.get(response.status, 0) + 1
                        )
            except aiohttp.ClientError:
                result.errors += 1
            if on_progress is not None:
                on_progress(1)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return result
