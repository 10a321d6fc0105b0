"""`tickpipe bench --read`: the read API and the realtime push, under load, in one run.

The data goes in the way a feeder's does (batch POSTs, committed by the
flushers): 200,000 ticks over 100 symbols, one every millisecond in turn, and
10,000 ticks of one more symbol among them for the paged range. Then, against
``ingest --workers N`` with its flushers, wrk GETs (``--connections``):

- latest: ``/ticks/{symbol}/latest`` over the 100 symbols (from Redis);
- history: ``/ticks/{symbol}?limit=1000`` over the 100 symbols;
- range: the 10 pages of 1,000 of a 10,000-row ``from``/``to`` range, cursor by
  cursor (the pages' paths, found once, in turn).

And the push: single-tick POSTs (wrk) with no event-stream client, then with
100 clients subscribed to 5 symbols each (one process of them, tickpipe/lab/
bench_sse.py), about 5% of the ticks each. The figures: ingest throughput with
the clients against without them, and ingest's extra CPU per event delivered.

``--baseline FILE`` (an earlier run's JSON) adds each figure's ratio to that run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
from rich.console import Console
from rich.table import Table

from tickpipe.client import TickClient
from tickpipe.core.ticks import Tick
from tickpipe.lab.bench import (
    Bench,
    BenchConfig,
    Components,
    Pipeline,
    ratio,
    wait_rows,
)
from tickpipe.lab.feeder import generate_ticks, tick_json
from tickpipe.lab.stall import Stalled, reaped

SYMBOLS = tuple(f"B{n}" for n in range(100))
"""The symbols of the history rows, of the loads' ticks and of the event-stream clients."""
RANGE_SYMBOL = "RANGE"
HISTORY_LIMIT = 1000
SSE_CLIENTS = 100
SYMBOLS_PER_CLIENT = 5
START_US = 1_700_000_000_000_000

TARGETS = {
    "history_vs_baseline": 6.0,
    "ingest_with_clients_vs_without": 0.85,
}
MAX_CPU_US_PER_EVENT = 10.0


@dataclasses.dataclass(frozen=True)
class ReadData:
    """What the reads go to: ``rows`` ticks over SYMBOLS and a twentieth as many of RANGE."""

    rows: int = 200_000

    @property
    def range_rows(self) -> int:
        return self.rows // 20

    @property
    def page(self) -> int:
        """The range is read in ten pages."""
        return max(1, self.range_rows // 10)

    @property
    def history_rows(self) -> int:
        """Ticks in one history answer."""
        return min(HISTORY_LIMIT, self.rows // len(SYMBOLS))


class ReadBench(Bench):
    def __init__(self, config: BenchConfig, console: Console, data: ReadData) -> None:
        super().__init__(config, console)
        self.data = data
        self.load_symbols = len(SYMBOLS)  # each client's 5 symbols get 5% of the ticks

    async def load_history(self, pipeline: Pipeline) -> dict[str, Any]:
        """The rows every read goes to, through ingest and the flushers, then VACUUM ANALYZE."""
        # In time order, RANGE_SYMBOL's ticks among the others: rows land in the table
        # the way a live feed's do, a symbol's spread over many pages.
        mixed: list[Tick] = []
        every = self.data.rows // self.data.range_rows
        generated = generate_ticks(self.data.rows, SYMBOLS, start_us=START_US, source="bench")
        for i, tick in enumerate(generated):
            mixed.append(tick)
            if i % every == 0:
                mixed.append(
                    msgspec.structs.replace(tick, symbol=RANGE_SYMBOL, ts_us=tick.ts_us + 1)
                )
        async with TickClient(pipeline.url, self.token, max_batch=1000) as client:
            await client.send_many(tick_json(tick) for tick in mixed)
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            await wait_rows(conn, len(mixed), 300)
            await conn.execute("VACUUM ANALYZE md_ticks")
        finally:
            await conn.close()
        return {"rows": len(mixed), "symbols": len(SYMBOLS) + 1}

    async def range_paths(self, url: str) -> list[str]:
        """The paths of every page of RANGE_SYMBOL's range, following ``next``."""
        end_ms = (START_US + self.data.rows * 1000) // 1000  # past the last tick (137 us apart)
        path: str | None = (
            f"/ticks/{RANGE_SYMBOL}?from={START_US // 1000}&to={end_ms}&limit={self.data.page}"
        )
        paths, rows = [], 0
        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(url) as session:
            while path is not None:
                paths.append(path)
                async with session.get(path, headers=headers) as response:
                    body = await response.json()
                rows += len(body["ticks"])
                path = body["next"]
        if rows != self.data.range_rows:
            raise Stalled(f"the range holds {rows} rows, not {self.data.range_rows}")
        return paths

    async def gets(self, pipeline: Pipeline, name: str, paths: list[str]) -> dict[str, Any]:
        """wrk GETs of ``paths`` in turn: requests/s, latency, CPU of each component."""
        listing = self.logs / f"{name}.paths"
        listing.write_text("\n".join(paths) + "\n")
        components = self.components(pipeline)
        with self.measured(components) as cpu:
            report = await self.load(pipeline.url, "get", paths=listing)
        refused = sum(n for status, n in report["statuses"].items() if not 200 <= int(status) < 300)
        if refused:
            raise Stalled(f"{name}: {refused} requests refused: {report['statuses']}")
        return {
            "requests_per_s": report["ticks_per_s"],
            "requests": report["requests"],
            "latency_ms": report["latency_ms"],
            "component_cpu_s": cpu,
            "load_cpu_s": report["cpu_s"],
        }

    async def ingest_run(
        self, pipeline: Pipeline, rate: float = 0.0, extra: Components | None = None
    ) -> dict[str, Any]:
        """Single-tick POSTs (wrk at full speed, or the Python loader at ``rate`` ticks/s)."""
        components = self.components(pipeline)
        for name, pids in (extra.roots if extra else {}).items():
            for pid in pids:
                components.add(name, pid)
        with self.measured(components) as cpu:
            report = await self.load(pipeline.url, "single", rate)
        return {
            "ticks_per_s": report["ticks_per_s"],
            "accepted_ticks": report["accepted_ticks"],
            "elapsed_s": report["elapsed_s"],
            "latency_ms": report["latency_ms"],
            "component_cpu_s": cpu,
        }

    @contextlib.asynccontextmanager
    async def sse_clients(self, pipeline: Pipeline) -> AsyncIterator[SseClients]:
        """SSE_CLIENTS event-stream clients, connected, in a process of their own."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickpipe.lab.bench_sse", pipeline.url,
            "--clients", str(SSE_CLIENTS), "--symbols-per-client", str(SYMBOLS_PER_CLIENT),
            "--universe", str(len(SYMBOLS)), "--prefix", "B",
            env={**self.env(), "TICKPIPE_BENCH_TOKEN": self.token},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        async with reaped(proc):
            async with asyncio.timeout(60):
                line = await proc.stdout.readline()
            if line.strip() != b"ready":
                raise Stalled(f"the event-stream clients did not start: {line!r}")
            clients = SseClients(Components())
            clients.components.add("sse clients", proc.pid)
            await asyncio.sleep(0.5)
            yield clients
            await asyncio.sleep(1.0)  # the last events reach the clients
            proc.send_signal(signal.SIGINT)
            out, _ = await proc.communicate()
        clients.received = json.loads(out.splitlines()[-1])

    async def fan_out(self, pipeline: Pipeline) -> dict[str, Any]:
        """Ingest without and with SSE_CLIENTS event-stream clients.

        Throughput: wrk at full speed, without and with the clients, twice in turn
        (the ratio of the sums evens out the machine's drift). CPU per event: the
        Python loader at one fixed rate (half the throughput without clients),
        without and with the clients, so that ingest does the same work for the
        ticks and the difference is what the events cost.
        """
        rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        events = ended = 0
        for _ in range(2):
            without = await self.ingest_run(pipeline)
            async with self.sse_clients(pipeline) as clients:
                with_clients = await self.ingest_run(pipeline, extra=clients.components)
            events += clients.received["events"]
            ended += clients.received["ended_by_server"]
            rounds.append((without, with_clients))
        rate = round(sum(w["ticks_per_s"] for w, _ in rounds) / len(rounds) / 2)
        paced = await self.ingest_run(pipeline, rate)
        async with self.sse_clients(pipeline) as clients:
            paced_with = await self.ingest_run(pipeline, rate, clients.components)
        paced_events = clients.received["events"]
        ended += clients.received["ended_by_server"]
        scale = paced_with["accepted_ticks"] / paced["accepted_ticks"]
        cpu, cpu_with = paced["component_cpu_s"], paced_with["component_cpu_s"]

        def us_per_event(component: str, extra: float | None = None) -> float | None:
            if not paced_events:
                return None
            spent = cpu_with[component] - cpu[component] * scale if extra is None else extra
            return round(spent / paced_events * 1e6, 2)

        ticks = [sum(run[i]["accepted_ticks"] for run in rounds) for i in (0, 1)]
        seconds = [sum(run[i]["elapsed_s"] for run in rounds) for i in (0, 1)]
        return {
            "clients": SSE_CLIENTS,
            "symbols_per_client": SYMBOLS_PER_CLIENT,
            "rounds": [{"without_clients": w, "with_clients": c} for w, c in rounds],
            "without_clients": {"ticks_per_s": round(ticks[0] / seconds[0], 1)},
            "with_clients": {"ticks_per_s": round(ticks[1] / seconds[1], 1)},
            "events_delivered": events,
            "events_per_s": round(events / seconds[1], 1),
            # Clients the server dropped (too slow) in any run: they stop counting, and
            # ingest then does less for them, so the figures would flatter it.
            "clients_ended_by_server": ended,
            "ingest_with_clients_vs_without": ratio(ticks[1] / seconds[1], ticks[0] / seconds[0]),
            "paced": {
                "rate": rate,
                "without_clients": paced,
                "with_clients": paced_with,
                "events_delivered": paced_events,
            },
            "cpu_us_per_event": {
                "ingest": us_per_event("ingest"),
                "redis": us_per_event("redis"),
                "sse clients": us_per_event("sse clients", cpu_with["sse clients"]),
            },
        }


@dataclasses.dataclass
class SseClients:
    components: Components
    received: dict[str, int] = dataclasses.field(default_factory=dict)
    """What the clients counted: events, connected, ended_by_server (once they stopped)."""


async def run_read_bench(
    config: BenchConfig,
    console: Console,
    baseline: dict[str, Any] | None = None,
    data: ReadData | None = None,
) -> dict[str, Any]:
    from rich.progress import Progress

    data = data or ReadData()
    bench = ReadBench(config, console, data)
    results: dict[str, Any] = {"config": {k: str(v) for k, v in dataclasses.asdict(config).items()}}
    try:
        await bench.setup()
        await bench.reset_data()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("read bench: starting", total=5)
            pipeline = await bench.start_pipeline()
            progress.update(task, description=f"read bench: {data.rows + data.range_rows} rows in")
            results["data"] = await bench.load_history(pipeline)
            progress.advance(task)
            for key, label, paths in (
                ("latest", "latest", [f"/ticks/{s}/latest" for s in SYMBOLS]),
                (
                    "history",
                    f"history of {HISTORY_LIMIT}",
                    [f"/ticks/{s}?limit={HISTORY_LIMIT}" for s in SYMBOLS],
                ),
                ("range", "a range in pages", await bench.range_paths(pipeline.url)),
            ):
                progress.update(task, description=f"read bench: {label}")
                results[key] = await bench.gets(pipeline, key, paths)
                progress.advance(task)
            pages = len(await bench.range_paths(pipeline.url))
            results["range"]["pages_per_range"] = pages
            results["range"]["rows_per_s"] = round(
                results["range"]["requests_per_s"] * data.range_rows / pages, 1
            )
            results["history"]["rows_per_s"] = round(
                results["history"]["requests_per_s"] * data.history_rows, 1
            )
            progress.update(task, description="read bench: SSE fan-out")
            results["sse"] = await bench.fan_out(pipeline)
            progress.advance(task)
            bench.stop_pipeline(pipeline)
    finally:
        await bench.teardown()
    results["data"] |= {"range_rows": data.range_rows, "page": data.page}
    results["vs_baseline"] = compare(results, baseline) if baseline else None
    return results


FIGURES = (
    ("latest req/s", ("latest", "requests_per_s")),
    ("history req/s", ("history", "requests_per_s")),
    ("range rows/s", ("range", "rows_per_s")),
    ("ingest ticks/s, no SSE client", ("sse", "without_clients", "ticks_per_s")),
    (f"ingest ticks/s, {SSE_CLIENTS} SSE clients", ("sse", "with_clients", "ticks_per_s")),
    ("  with / without", ("sse", "ingest_with_clients_vs_without")),
    ("SSE events delivered/s", ("sse", "events_per_s")),
    ("ingest CPU us per event", ("sse", "cpu_us_per_event", "ingest")),
    ("Redis CPU us per event", ("sse", "cpu_us_per_event", "redis")),
    ("the clients' CPU us per event", ("sse", "cpu_us_per_event", "sse clients")),
)


def figure(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def compare(results: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    return {name: ratio(figure(results, path), figure(baseline, path)) for name, path in FIGURES}


def render_read(results: dict[str, Any], console: Console) -> None:
    against = results.get("vs_baseline") or {}
    data = results["data"]
    reads = Table(title="tickpipe bench --read: queries", title_justify="left")
    for column in ("GET", "req/s", "rows/s", "p50 ms", "p99 ms", "vs baseline", "CPU s"):
        reads.add_column(column, justify="left" if column == "GET" else "right")
    for key, label, name in (
        ("latest", "/ticks/{symbol}/latest", "latest req/s"),
        ("history", f"/ticks/{{symbol}}?limit={HISTORY_LIMIT}", "history req/s"),
        ("range", f"a range of {data['range_rows']:,} rows in pages", "range rows/s"),
    ):
        run = results[key]
        reads.add_row(
            label,
            _text(run["requests_per_s"]),
            _text(run.get("rows_per_s")),
            _text(run["latency_ms"]["p50"]),
            _text(run["latency_ms"]["p99"]),
            _text(against.get(name)),
            ", ".join(f"{k} {v}" for k, v in run["component_cpu_s"].items()),
        )
    console.print(reads)
    sse = results["sse"]
    push = Table(
        title=f"tickpipe bench --read: SSE push, {sse['clients']} clients of"
        f" {sse['symbols_per_client']} symbols",
        title_justify="left",
    )
    for column in ("measure", "this run", "target", "vs baseline"):
        push.add_column(column, justify="left" if column == "measure" else "right")
    cpu = sse["cpu_us_per_event"]
    for name, value, target in (
        ("ingest ticks/s, no SSE client", sse["without_clients"]["ticks_per_s"], ""),
        (f"ingest ticks/s, {SSE_CLIENTS} SSE clients", sse["with_clients"]["ticks_per_s"], ""),
        (
            "  with / without",
            sse["ingest_with_clients_vs_without"],
            f">= {TARGETS['ingest_with_clients_vs_without']}",
        ),
        ("SSE events delivered/s", sse["events_per_s"], ""),
        ("ingest CPU us per event", cpu["ingest"], f"<= {MAX_CPU_US_PER_EVENT}"),
        ("Redis CPU us per event", cpu["redis"], ""),
        ("the clients' CPU us per event", cpu["sse clients"], ""),
    ):
        push.add_row(name, _text(value), target, _text(against.get(name)))
    console.print(push)
    console.print(
        f"CPU per event at {sse['paced']['rate']} ticks/s (with and without the clients);"
        f" {sse['clients_ended_by_server']} clients ended by the server"
        f"{' (too slow: the figures flatter the push)' if sse['clients_ended_by_server'] else ''}."
        + (
            f" history vs baseline: {against.get('history req/s')}"
            f" (target >= {TARGETS['history_vs_baseline']})"
            if against
            else ""
        )
    )


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def load_baseline(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded
