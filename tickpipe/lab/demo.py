"""`tickpipe demo`: feeder -> ingest -> two flushers -> Postgres, on the local stack.

Midway one flusher is killed with SIGKILL while it holds entries; the other
takes them over once its heartbeat expires, and the demo ends by checking that every
acknowledged tick is in md_ticks, exactly.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from decimal import Decimal

import asyncpg
import click

from tickpipe.core.settings import Settings
from tickpipe.core.ticks import Tick, datetime_to_us
from tickpipe.lab.feeder import NotReady, feed, generate_ticks, wait_ready
from tickpipe.lab.processes import Processes
from tickpipe.lab.stack import LocalStack, free_port

DEMO_SYMBOLS = ("DEMO.AAPL", "DEMO.MSFT", "DEMO.EURUSD", "DEMO.BTC-USD", "DEMO.ES:F")


def run_demo(settings: Settings, *, ticks: int) -> bool:
    """Run the demo; True when every acknowledged tick is in Postgres with its exact value."""
    stack = LocalStack.from_settings(settings)
    stack.up()
    stack.write_info()
    token = secrets.token_urlsafe(24)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": stack.redis_url,
        "DATABASE_URL": stack.database_url,
        "INGEST_TOKENS": f"demo:{token}",
        "INGEST_PORT": str(port),
        "FLUSH_INTERVAL_S": "0.2",
    }
    say(f"stack up: {stack.redis_url}  {stack.database_url}")
    with Processes() as processes:
        procs = {"ingest": _spawn(processes, "ingest", ["ingest"], env)}
        for name in ("demo-flusher-a", "demo-flusher-b"):
            procs[name] = _spawn(processes, name, ["flusher", "run", "--consumer", name], env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(wait_ready(f"{base_url}/readyz", 30.0))
        except NotReady as exc:
            raise click.ClickException(f"ingest did not start: {exc}") from None
        say(f"ingest on {base_url}, flushers demo-flusher-a and demo-flusher-b running")
        ok = asyncio.run(_feed_and_check(base_url, token, stack.database_url, ticks, procs))
    say("")
    say("$ tickpipe audit --verify")
    audit = subprocess.run(
        [sys.executable, "-m", "tickpipe", "audit", "--verify"], env=env, check=False
    )
    _closing_words(stack.database_url)
    return ok and audit.returncode == 0


async def _feed_and_check(
    base_url: str,
    token: str,
    database_url: str,
    count: int,
    procs: dict[str, subprocess.Popen[bytes]],
) -> bool:
    sent = generate_ticks(count, DEMO_SYMBOLS, seed=int(time.time()))
    first, second = sent[: count // 2], sent[count // 2 :]
    conn = await asyncpg.connect(database_url)
    try:
        say(f"feeding {len(first)} ticks ...")
        accepted = (await feed(base_url, token, first)).accepted
        say(f"  rows in md_ticks: {await _count_rows(conn, sent)}")

        victim = procs["demo-flusher-b"]
        say(f"kill -9 demo-flusher-b (pid {victim.pid}) while feeding {len(second)} more ticks")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        accepted += (await feed(base_url, token, second)).accepted
        say(f"  rows in md_ticks: {await _count_rows(conn, sent)}")
        say(
            "demo-flusher-a takes over what demo-flusher-b held once its heartbeat expires"
            " (FLUSH_DEAD_AFTER_S)"
        )

        deadline = time.monotonic() + 60
        missing, wrong = _compare(accepted, await _fetch_rows(conn, sent))
        while (missing or wrong) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            missing, wrong = _compare(accepted, await _fetch_rows(conn, sent))
            say(f"  rows in md_ticks: {len(accepted) - missing}/{len(accepted)}")
    finally:
        await conn.close()
    say("")
    say(f"ticks sent          {len(sent)}")
    say(f"acknowledged (200)  {len(accepted)}")
    say(f"in md_ticks, exact  {len(accepted) - missing - wrong}")
    say(f"missing             {missing}")
    say(f"wrong value         {wrong}")
    ok = missing == 0 and wrong == 0 and len(accepted) == len(sent)
    say("zero lost: every acknowledged tick is in Postgres" if ok else "LOSS DETECTED")
    return ok


def _closing_words(database_url: str) -> None:
    say("")
    say("the stack is still running; look around with:")
    say(f"  psql {database_url} -c 'SELECT * FROM md_ticks ORDER BY ts DESC LIMIT 5'")
    say("and stop it with `tickpipe down` (or `make down`)")


async def _count_rows(conn: asyncpg.Connection, sent: Sequence[Tick]) -> int:
    return len(await _fetch_rows(conn, sent))


async def _fetch_rows(
    conn: asyncpg.Connection, sent: Sequence[Tick]
) -> dict[tuple[str, int], tuple[Decimal, Decimal, str]]:
    rows = await conn.fetch(
        "SELECT symbol, ts, price, volume, source FROM md_ticks"
        " WHERE symbol = ANY($1) AND ts BETWEEN $2 AND $3",
        list(DEMO_SYMBOLS),
        min(t.ts for t in sent),
        max(t.ts for t in sent),
    )
    return {
        (r["symbol"], datetime_to_us(r["ts"])): (r["price"], r["volume"], r["source"]) for r in rows
    }


def _compare(
    accepted: Sequence[Tick], rows: dict[tuple[str, int], tuple[Decimal, Decimal, str]]
) -> tuple[int, int]:
    missing = wrong = 0
    for tick in accepted:
        row = rows.get(tick.key)
        if row is None:
            missing += 1
        elif row != (tick.price, tick.volume, tick.source):
            wrong += 1
    return missing, wrong


def _spawn(
    processes: Processes, name: str, args: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    # Ingest's access log would drown the demo's own output.
    level = "warning" if args[0] == "ingest" else "info"
    return processes.tickpipe(name, ["--log-level", level, *args], env, capture=False)


def say(message: str) -> None:
    click.echo(message, err=True)
