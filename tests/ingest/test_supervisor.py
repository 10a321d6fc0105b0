"""`tickpipe ingest --workers N` as real processes: one port, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tickpipe.lab.feeder import wait_ready
from tickpipe.lab.processes import Processes
from tickpipe.lab.stack import free_port

pytestmark = pytest.mark.services

AUTH = {"Authorization": "Bearer test-token-0123456789"}
TICK = {"symbol": "W", "ts": 1, "price": "1.5", "volume": 1, "source": "s"}


@pytest.fixture
def server(
    subprocess_env: dict[str, str], redis: Redis
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    with Processes() as processes:
        proc = processes.tickpipe(
            "ingest",
            ["ingest", "--workers", "2", "--port", str(port)],
            {**subprocess_env, "INGEST_SHUTDOWN_TIMEOUT_S": "20"},
            capture=False,
        )
        yield f"http://127.0.0.1:{port}", proc


async def ready(base: str) -> None:
    await wait_ready(f"{base}/readyz", 30.0)


async def test_workers_share_the_port_and_the_metrics(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, proc = server
    await ready(base)
    pids = set()
    # A new connection per request, so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Both workers answer once both have started (the second may be slower to).
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            async with session.get(f"{base}/healthz") as response:
                pids.add((await response.json())["pid"])
        assert len(pids) == 2
        for _ in range(60):
            async with session.post(f"{base}/ingest/tick", json=TICK, headers=AUTH) as response:
                assert response.status == 200
        assert proc.pid not in pids
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    accepted = [
        line
        for line in text.splitlines()
        if line.startswith('tickpipe_ingest_ticks_accepted_total{token="feeder-a"}')
    ]
    assert accepted == ['tickpipe_ingest_ticks_accepted_total{token="feeder-a"} 60.0']


async def slow_body(first: bytes, rest: bytes, gate: asyncio.Event) -> AsyncIterator[bytes]:
    yield first
    await gate.wait()
    yield rest


async def test_sigterm_lets_in_flight_requests_finish(
    server: tuple[str, subprocess.Popen[bytes]], redis: Redis
) -> None:
    base, proc = server
    await ready(base)
    body = json.dumps(TICK).encode()
    gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            session.post(
                f"{base}/ingest/tick",
                data=slow_body(body[:10], body[10:], gate),
                headers={**AUTH, "Content-Type": "application/json"},
            )
        )
        await asyncio.sleep(0.5)  # the worker holds half a body
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        gate.set()
        response = await request
        assert response.status == 200
        [entry_id] = (await response.json())["ids"]
        response.release()
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert [i.decode() for i, _ in await redis.xrange("ticks.received")] == [entry_id]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_stop_when_the_supervisor_is_killed(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, proc = server
    await ready(base)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    async with asyncio.timeout(30):
        while any(running(pid) for pid in workers):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


def test_a_port_taken_stops_the_supervisor_instead_of_restarting_forever(
    subprocess_env: dict[str, str],
) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "tickpipe", "ingest", "--workers", "2", "--port", str(port)],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert run.returncode == 1
    assert "cannot listen" in run.stderr
    assert "configuration error" in run.stderr
    assert "restarting in" not in run.stderr
