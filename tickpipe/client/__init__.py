"""The feeder's side of tickpipe: send ticks to ingest without writing HTTP code.

    async with TickClient("http://127.0.0.1:8080", token) as client:
        await client.send({"symbol": "AAPL", "ts": "2026-11-26T12:00:00Z",
                           "price": Decimal("189.12"), "volume": 100, "source": "nasdaq"})

Only aiohttp and msgspec are needed; nothing of the pipeline's servers is imported.
"""

from tickpipe.client.client import ClientStats, TickClient, TickLike
from tickpipe.client.errors import (
    ClientError,
    RequestRejected,
    TickFailure,
    TickRejected,
    TicksFailed,
    Unavailable,
)
from tickpipe.client.sync import SyncTickClient

__all__ = [
    "ClientError",
    "ClientStats",
    "RequestRejected",
    "SyncTickClient",
    "TickClient",
    "TickFailure",
    "TickLike",
    "TickRejected",
    "TicksFailed",
    "Unavailable",
]
