"""The load generator of `tickpipe bench`, a process of its own.

``python -m tickpipe.bench_load URL --mode single|batch --duration-s D [--rate R]``
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

import aiohttp

from tickpipe.loop import run
from tickpipe.stall import STALL_AFTER_S


def payloads(mode: str, batch: int, start_ts_ms: int, count: int) -> list[bytes]:
    """Pre-encoded bodies with unique (symbol, ts) keys, so encoding costs nothing later."""
    bodies = []
    size = 1 if mode == "single" else batch
    for n in range(count):
        ticks = [
            f'{{"symbol":"B{(n * size + i) % 64}","ts":{start_ts_ms + n * size + i},'
            f'"price":"{100 + (n + i) % 997}.{(n * 7 + i) % 100:02d}","volume":{(n + i) % 1000},'
            '"source":"bench"}'
            for i in range(size)
        ]
        bodies.append((ticks[0] if mode == "single" else "[" + ",".join(ticks) + "]").encode())
    return bodies


async def load(args: argparse.Namespace) -> dict[str, object]:
    path = "/ingest/tick" if args.mode == "single" else "/ingest/ticks"
    per_request = 1 if args.mode == "single" else args.batch
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    bodies = payloads(args.mode, args.batch, args.start_ts_ms, 50_000)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    timeline: Counter[int] = Counter()
    sent = 0
    started = time.perf_counter()
    deadline = started + args.duration_s
    last_ok = started
    last_refusal = ""
    stalled = ""
    connector = aiohttp.TCPConnector(limit=args.connections)

    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes) -> None:
            nonlocal last_ok, last_refusal, deadline, stalled
            t0 = time.perf_counter()
            try:
                async with session.post(args.url + path, data=body, headers=headers) as response:
                    text = await response.read()
                    status = str(response.status)
            except aiohttp.ClientError as exc:
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
                task = asyncio.create_task(one(bodies[sent % len(bodies)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
                next_at += interval
            await asyncio.gather(*tasks)
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
    parser = argparse.ArgumentParser(prog="python -m tickpipe.bench_load")
    parser.add_argument("url")
    parser.add_argument("--token", default="")
    parser.add_argument("--mode", choices=["single", "batch"], default="single")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="ticks/s; 0 = as fast as possible")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--start-ts-ms", type=int, default=1_600_000_000_000)
    result = run(load(parser.parse_args()))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
