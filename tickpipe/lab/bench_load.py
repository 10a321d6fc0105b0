"""The load generator of `tickpipe bench`, a process of its own.

``python -m tickpipe.lab.bench_load URL --mode single|batch --duration-s D [--rate R]``
prints one JSON object: requests, accepted ticks, statuses, latency percentiles
(ms) and a per-second timeline. ``--rate 0`` is closed-loop at maximum speed
with ``--connections`` requests in flight; a rate is open-loop: requests leave
on schedule whatever the answers, so latency is not hidden by waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import cast
from urllib.parse import urlsplit

from tickpipe.core.loop import run
from tickpipe.lab.stall import STALL_AFTER_S


def payloads(mode: str, batch: int, start_ts_ms: int, count: int, symbols: int = 64) -> list[bytes]:
    """Pre-encoded bodies with unique (symbol, ts) keys, so encoding costs nothing later.

    The symbols are B0 to B{symbols - 1}, in turn.
    """
    bodies = []
    size = 1 if mode == "single" else batch
    for n in range(count):
        ticks = [
            f'{{"symbol":"B{(n * size + i) % symbols}","ts":{start_ts_ms + n * size + i},'
            f'"price":"{100 + (n + i) % 997}.{(n * 7 + i) % 100:02d}","volume":{(n + i) % 1000},'
            '"source":"bench"}'
            for i in range(size)
        ]
        bodies.append((ticks[0] if mode == "single" else "[" + ",".join(ticks) + "]").encode())
    return bodies


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one request at a time.

    A load generator must cost little next to what it measures: an aiohttp
    client spends about 150 us of CPU per request, as much as ingest itself on
    two shared cores. This reads just the status line and Content-Length.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[str, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._answer()

    def request(self, payload: bytes) -> asyncio.Future[tuple[str, bytes]]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self._waiter

    def _answer(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else None])
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        status = head[9:12].decode()
        body = bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result((status, body))


class _Pool:
    """Up to ``size`` connections to ``host:port``; a request waits for an idle one."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self._host, self._port, self._size = host, port, size
        self._idle: list[_Connection] = []
        self._open = 0
        self._freed = asyncio.Condition()

    async def send(self, payload: bytes) -> tuple[str, bytes]:
        connection = await self._take()
        try:
            return await connection.request(payload)
        finally:
            await self._give(connection)

    async def _take(self) -> _Connection:
        async with self._freed:
            while not self._idle and self._open >= self._size:
                await self._freed.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            _transport, connection = await asyncio.get_running_loop().create_connection(
                _Connection, self._host, self._port
            )
        except BaseException:
            async with self._freed:
                self._open -= 1
                self._freed.notify()
            raise
        return connection

    async def _give(self, connection: _Connection) -> None:
        async with self._freed:
            if connection.closed or connection._waiter is not None:
                self._open -= 1
                if connection.transport is not None:
                    connection.transport.close()
            else:
                self._idle.append(connection)
            self._freed.notify()

    def close(self) -> None:
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()


async def load(args: argparse.Namespace) -> dict[str, object]:
    path = "/ingest/tick" if args.mode == "single" else "/ingest/ticks"
    per_request = 1 if args.mode == "single" else args.batch
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {args.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode()
    bodies = payloads(args.mode, args.batch, args.start_ts_ms, 50_000, args.symbols)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    timeline: Counter[int] = Counter()
    sent = 0
    started = time.perf_counter()
    deadline = started + args.duration_s
    last_ok = started
    last_refusal = ""
    stalled = ""
    pool = _Pool(host, port, args.connections)
    try:

        async def one(body: bytes, due: float | None = None) -> None:
            """Send one request; its latency counts from ``due`` (open loop) or now."""
            nonlocal last_ok, last_refusal, deadline, stalled
            t0 = time.perf_counter() if due is None else due
            try:
                status, text = await pool.send(head + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError as exc:
                status, text = type(exc).__name__, str(exc).encode()
            t1 = time.perf_counter()
            statuses[status] += 1
            if status == "200":
                latencies.append((t1 - t0) * 1000)
                timeline[int(t1 - started)] += per_request
                last_ok = t1
                return
            last_refusal = f"{status} {text[:300].decode(errors='replace')}"
            if t1 - last_ok > STALL_AFTER_S and not stalled:
                # Nothing acknowledged for a while: say why and stop, do not retry forever.
                stalled = (
                    f"no tick acknowledged for {t1 - last_ok:.0f} s; answers"
                    f" {dict(statuses)}; last refusal: {last_refusal}"
                )
                deadline = t1

        if args.rate <= 0:

            async def closed_loop() -> None:
                nonlocal sent
                while time.perf_counter() < deadline:
                    body = bodies[sent % len(bodies)]
                    sent += 1
                    await one(body)

            await asyncio.gather(*(closed_loop() for _ in range(args.connections)))
        else:
            interval = per_request / args.rate
            tasks = set()
            next_at = started
            while next_at < deadline:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                task = asyncio.create_task(one(bodies[sent % len(bodies)], next_at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
                next_at += interval
            await asyncio.gather(*tasks)
    finally:
        pool.close()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)
            if latencies
            else None
        )

    accepted = statuses["200"] * per_request
    return {
        "loader": "python",
        "stalled": stalled,
        "mode": args.mode,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "accepted_ticks": accepted,
        "elapsed_s": round(elapsed, 3),
        "ticks_per_s": round(accepted / elapsed, 1),
        "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
        # Whole seconds only: a last partial second would look like a drop.
        "timeline": [timeline.get(second, 0) for second in range(max(1, int(elapsed)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tickpipe.lab.bench_load")
    parser.add_argument("url")
    parser.add_argument("--token", default="")
    parser.add_argument("--mode", choices=["single", "batch"], default="single")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="ticks/s; 0 = as fast as possible")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--start-ts-ms", type=int, default=1_600_000_000_000)
    parser.add_argument("--symbols", type=int, default=64, help="ticks of B0 to B<n-1>")
    result = run(load(parser.parse_args()))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
