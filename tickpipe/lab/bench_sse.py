"""Event-stream clients for `tickpipe bench --read`: many subscribers in one process.

    python -m tickpipe.lab.bench_sse URL --clients 100 --symbols-per-client 5

Each client opens ``GET /ticks/stream?symbols=...`` on a plain socket and counts
the tick events it receives; it parses nothing else, so the clients cost little
of the cores the server under test shares. The process prints ``ready`` once every
client has its answer's headers, and on SIGINT or SIGTERM one JSON line: events
received, clients still connected, and clients the server ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
from typing import cast

import uvloop

TICK = b"event: tick\r\n"


class _Subscriber(asyncio.Protocol):
    """One event stream: counts tick events, however the reads split them."""

    def __init__(self, request: bytes, answered: asyncio.Future[int]) -> None:
        self._request = request
        self._answered = answered
        self._head = b""
        self._tail = b""
        self.events = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self._answered.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(self._head.split(b" ", 2)[1])
            self._answered.set_result(status)
            data = self._head[end + 4 :]
        seen = self._tail + data
        self.events += seen.count(TICK)
        self._tail = seen[-(len(TICK) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._answered.done():
            self._answered.set_exception(ConnectionError("closed before answering"))


def _same(protocol: _Subscriber) -> _Subscriber:
    return protocol


def symbols_of(client: int, per_client: int, universe: int, prefix: str) -> list[str]:
    """Client n's symbols: ``per_client`` consecutive ones of ``universe``, from n * per_client."""
    return [f"{prefix}{(client * per_client + k) % universe}" for k in range(per_client)]


async def run(args: argparse.Namespace) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    host, _, port = args.url.removeprefix("http://").rstrip("/").partition(":")
    token = os.environ.get("TICKPIPE_BENCH_TOKEN", "")
    subscribers: list[_Subscriber] = []
    answers: list[asyncio.Future[int]] = []
    for n in range(args.clients):
        symbols = ",".join(symbols_of(n, args.symbols_per_client, args.universe, args.prefix))
        request = (
            f"GET /ticks/stream?symbols={symbols} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        answered: asyncio.Future[int] = loop.create_future()
        protocol = _Subscriber(request, answered)
        await loop.create_connection(functools.partial(_same, protocol), host, int(port or 80))
        subscribers.append(protocol)
        answers.append(answered)
    statuses = await asyncio.gather(*answers)
    if any(status != 200 for status in statuses):
        raise SystemExit(f"bench_sse: answers {sorted(set(statuses))}, not all 200")
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    return {
        "events": sum(s.events for s in subscribers),
        "connected": sum(not s.closed for s in subscribers),
        "ended_by_server": sum(s.closed for s in subscribers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--symbols-per-client", type=int, default=5)
    parser.add_argument("--universe", type=int, default=100, help="symbols PREFIX0..PREFIXn-1")
    parser.add_argument("--prefix", default="B")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
