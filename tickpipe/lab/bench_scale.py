"""`tickpipe bench --shards N`: how throughput grows with shards and flushers.

On a local Redis Cluster (3 masters, no replicas: the bench measures
throughput, not failover) and the local Postgres, for each configuration in
turn: the flusher drain rate (a backlog spread over the shards, drained by K
flushers in ``--burst``) and the end-to-end rate of batch POSTs (ingest with
its workers, K flushers, committed rows/s counted in Postgres). Every process
shares this machine's cores, so the figures to read are the ratios within one
run; docs/scaling.md turns them into capacity arithmetic.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table

from ingest.writer import TickWriter
from tickpipe.core import keys, redis_conn
from tickpipe.lab.bench import Bench, BenchConfig, Components, ratio, sample_ticks
from tickpipe.lab.cluster_stack import LocalCluster


@dataclasses.dataclass(frozen=True)
class Topology:
    shards: int
    flushers: int

    @property
    def name(self) -> str:
        return f"{self.shards} shard{'s' * (self.shards > 1)}, {self.flushers} flusher" + (
            "s" * (self.flushers > 1)
        )


def shapes(shards: int, flushers: int) -> list[Topology]:
    """1x1, then more flushers on one stream, then more shards with as many flushers."""
    found = [
        Topology(1, 1),
        Topology(1, flushers),
        Topology(shards, flushers),
        Topology(shards, shards),
    ]
    return list(dict.fromkeys(found))


class ScaleBench(Bench):
    """The bench's processes, against a cluster with ``shape.shards`` streams."""

    def __init__(self, config: BenchConfig, console: Console) -> None:
        super().__init__(config, console)
        self.cluster = LocalCluster(config.state_dir / "cluster", replicas=0)
        self.shape = Topology(1, config.flushers)

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(
            REDIS_URL=self.cluster.url,
            REDIS_CLUSTER="1",
            STREAM_SHARDS=str(self.shape.shards),
            **extra,
        )

    async def setup(self) -> None:
        await super().setup()
        self.cluster.embedded_only = self.config.embedded_only
        await asyncio.to_thread(self.cluster.up)

    async def teardown(self) -> None:
        try:
            await super().teardown()
        finally:
            await asyncio.to_thread(self.cluster.down)

    def redis_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{node.port}/0" for node in self.cluster.nodes]

    def servers(self, components: Components) -> None:
        for node in self.cluster.nodes:
            pid = node.pid()
            if pid is not None:
                components.add("redis", pid)
        pg_pid = int((self.stack.pg_data / "postmaster.pid").read_text().split()[0])
        components.add("postgres", pg_pid)

    def redis(self) -> redis_conn.RedisClient:
        return redis_conn.connect_cluster(self.cluster.url, client_name="tickpipe-bench")

    async def drain_sharded(self) -> dict[str, Any]:
        """K flushers against a backlog spread over the shards: committed rows/s."""
        await self.reset_data()
        redis = self.redis()
        writer = TickWriter(redis, keys.STREAM, keys.LATEST, shards=self.shape.shards)
        ticks = sample_ticks(self.config.drain_entries, 3 * 10**15)
        for start in range(0, len(ticks), 1000):
            await writer.append(ticks[start : start + 1000])
        await redis.aclose()
        elapsed = await self.burst_flushers(
            [(f"drain-{self.shape.shards}-{n}", f"d{n}") for n in range(self.shape.flushers)]
        )
        return {
            "rows_per_s": round(self.config.drain_entries / elapsed, 1),
            "elapsed_s": round(elapsed, 2),
        }


async def run_scale(config: BenchConfig, shards: int, console: Console) -> dict[str, Any]:
    bench = ScaleBench(config, console)
    results: dict[str, Any] = {
        "config": {**{k: str(v) for k, v in dataclasses.asdict(config).items()}, "shards": shards},
        "runs": [],
    }
    try:
        await bench.setup()
        for shape in shapes(shards, config.flushers):
            bench.shape = shape
            bench.config = dataclasses.replace(config, flushers=shape.flushers)
            console.print(f"bench: {shape.name}")
            drain = await bench.drain_sharded()
            batch = await bench.tickpipe_run("batch")
            results["runs"].append(
                {
                    "shards": shape.shards,
                    "flushers": shape.flushers,
                    "drain_rows_per_s": drain["rows_per_s"],
                    "batch_accepted_ticks_per_s": batch["ticks_per_s"],
                    "batch_committed_rows_per_s": batch["committed_rows_per_s"],
                    "batch_accept_p99_ms": batch["latency_ms"]["p99"],
                    "component_cpu_s": batch["component_cpu_s"],
                    "redis_calls_per_tick": batch["redis_calls_per_tick"]["total"],
                    "xreadgroup_per_batch": batch["xreadgroup_per_batch"],
                }
            )
    finally:
        bench.config = config
        await bench.teardown()
    base = results["runs"][0]
    for run in results["runs"]:
        run["drain_vs_1x1"] = ratio(run["drain_rows_per_s"], base["drain_rows_per_s"])
        run["committed_vs_1x1"] = ratio(
            run["batch_committed_rows_per_s"], base["batch_committed_rows_per_s"]
        )
    return results


def render_scale(results: dict[str, Any], console: Console) -> None:
    table = Table(
        title="tickpipe bench --shards (ratios are within this run)", title_justify="left"
    )
    for column in ("shards", "flushers", "drain rows/s", "vs 1x1", "batch accepted ticks/s",
                   "committed rows/s", "vs 1x1", "accept p99 ms", "Redis calls/tick",
                   "XREADGROUP/batch"):  # fmt: skip
        table.add_column(column, justify="right")
    for run in results["runs"]:
        table.add_row(
            str(run["shards"]),
            str(run["flushers"]),
            f"{run['drain_rows_per_s']:,.0f}",
            str(run["drain_vs_1x1"]),
            f"{run['batch_accepted_ticks_per_s']:,.0f}",
            f"{run['batch_committed_rows_per_s']:,.0f}",
            str(run["committed_vs_1x1"]),
            str(run["batch_accept_p99_ms"]),
            str(run["redis_calls_per_tick"]),
            str(run["xreadgroup_per_batch"]),
        )
    console.print(table)
    console.print(f"load generator: {results['config']['loader']}")
