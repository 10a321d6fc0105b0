"""The `tickpipe` command line."""

from __future__ import annotations

import asyncio
import datetime
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tickpipe.core import loop
from tickpipe.core.settings import AppendFsync, Settings, SettingsError
from tickpipe.core.shards import MAX_SHARDS

if TYPE_CHECKING:
    from tickpipe.lab.bench_wrk import Loader

T = TypeVar("T")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with command-line flags (when given) on top."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    given = {name: value for name, value in overrides.items() if value is not None}
    return settings.replace(**given) if given else settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="TICKPIPE_LOG_LEVEL",
)
def main(log_level: str) -> None:
    """tickpipe: market ticks from a webhook into Postgres, through a Redis Stream."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- local stack ----------------------------------------------------------------


@main.command()
@click.option(
    "--appendfsync",
    type=click.Choice(["everysec", "always"]),
    default=None,
    help="Redis's AOF fsync policy (TICKPIPE_REDIS_APPENDFSYNC). `always` lets"
    " INGEST_DURABILITY=fsync work on a Redis without WAITAOF (before 7.2); default: as"
    " recorded in the state directory, else what INGEST_DURABILITY needs.",
)
def up(appendfsync: AppendFsync | None) -> None:
    """Start the local Redis and Postgres, apply the schema, print the URLs to export.

    Use as: eval "$(tickpipe up)"
    """
    from tickpipe.lab.stack import LocalStack, StackError

    settings = load_settings()
    stack = LocalStack.from_settings(settings)
    if appendfsync is not None:
        stack.appendfsync = appendfsync
    own_redis = not settings.redis_url_configured
    own_postgres = not settings.database_url_configured
    for name, own in (("REDIS_URL", own_redis), ("DATABASE_URL", own_postgres)):
        if not own:
            click.echo(f"tickpipe: {name} is set: using it, not starting a local server", err=True)
    try:
        stack.up(redis=own_redis, postgres=own_postgres)
        if not own_postgres:
            _apply_schema(settings.database_url)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    stack.write_info()
    click.echo(f"export REDIS_URL={stack.redis_url if own_redis else settings.redis_url}")
    click.echo(
        f"export DATABASE_URL={stack.database_url if own_postgres else settings.database_url}"
    )


@main.command()
def down() -> None:
    """Stop the local Redis and Postgres (their data stays in the state directory)."""
    from tickpipe.lab.stack import LocalStack, StackError

    try:
        LocalStack.from_settings(load_settings()).down()
    except StackError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
def status() -> None:
    """Show whether the local Redis and Postgres are running. Exit 1 if either is not."""
    from tickpipe.lab.stack import LocalStack

    services = LocalStack.from_settings(load_settings()).status()
    for service in services:
        state = f"running (pid {service.pid})" if service.running else "stopped"
        click.echo(f"{service.name:<9} {state:<22} {service.url}  [{service.detail}]")
    if not all(s.running for s in services):
        sys.exit(1)


# -- schema ---------------------------------------------------------------------


@main.group()
def schema() -> None:
    """Manage the Postgres schema."""


@schema.command("apply")
@click.option(
    "--rollups",
    is_flag=True,
    help="Also md_ranges, its GiST index and the triggers `tickpipe rollup` needs.",
)
@click.option("--brin", is_flag=True, help="Also a BRIN index on md_ticks(ts), for time scans.")
def schema_apply(rollups: bool, brin: bool) -> None:
    """Apply schema.sql (and the chosen options) to DATABASE_URL (idempotent)."""
    from tickpipe.core.schema import schema_files

    _apply_schema(load_settings().database_url, rollups=rollups, brin=brin)
    click.echo(f"schema applied: {', '.join(schema_files(rollups=rollups, brin=brin))}", err=True)


def _apply_schema(database_url: str, *, rollups: bool = False, brin: bool = False) -> None:
    import asyncpg

    from tickpipe.core.schema import apply_schema

    try:
        asyncio.run(apply_schema(database_url, rollups=rollups, brin=brin))
    except OSError as exc:
        raise click.ClickException(f"cannot reach Postgres at DATABASE_URL: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise click.ClickException(f"Postgres at DATABASE_URL refused the schema: {exc}") from None


# -- services -------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Address to listen on [env INGEST_HOST].")
@click.option("--port", type=int, default=None, help="Port to listen on [env INGEST_PORT].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes serving the port, SO_REUSEPORT [env INGEST_WORKERS, default 1].",
)
@click.option("--reuse-port", is_flag=True, hidden=True)
def ingest(host: str | None, port: int | None, workers: int | None, reuse_port: bool) -> None:
    """Serve the ingest HTTP API."""
    from ingest.app import ListenError, run
    from ingest.supervisor import EXIT_CONFIG, Supervisor
    from tickpipe.core.redis_conn import RedisConfigError

    settings = load_settings(ingest_host=host, ingest_port=port, ingest_workers=workers)
    if not settings.ingest_tokens:
        raise click.ClickException(
            "no ingest tokens: set INGEST_TOKENS=name:token[,...] or INGEST_TOKENS_FILE"
        )
    if settings.ingest_workers > 1:
        sys.exit(Supervisor(settings, settings.ingest_workers).run())
    try:
        run(settings, reuse_port=reuse_port)
    except (ListenError, RedisConfigError) as exc:
        message = (
            f"{exc}; choose another with --port or INGEST_PORT"
            if isinstance(exc, ListenError)
            else f"configuration: {exc}"
        )
        if reuse_port:  # a worker of --workers N: tell the supervisor not to restart it
            click.echo(f"tickpipe: error: {message}", err=True)
            sys.exit(EXIT_CONFIG)
        raise click.ClickException(message) from None


@main.group()
def flusher() -> None:
    """Move ticks from the stream into Postgres."""


@flusher.command("run")
@click.option("--consumer", default=None, help="Stable consumer name [env FLUSHER_CONSUMER].")
@click.option(
    "--burst",
    is_flag=True,
    help="Drain the stream, then exit: 1 if entries were dead-lettered or left pending.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on this port [env FLUSHER_METRICS_PORT, default off].",
)
@click.option(
    "--check", is_flag=True, help="Check Redis, the group and Postgres, then exit (0 = ready)."
)
def flusher_run(consumer: str | None, burst: bool, metrics_port: int | None, check: bool) -> None:
    """Run one flusher until SIGTERM/SIGINT.

    With --burst, exit 1 when the run dead-lettered entries or left some pending.
    """
    from flusher.run import FlusherError, burst_problems, run_flusher
    from flusher.run import check as check_ready

    settings = load_settings(flusher_consumer=consumer, flusher_metrics_port=metrics_port)
    if check:
        problems = asyncio.run(check_ready(settings))
        for problem in problems:
            click.echo(f"not ready: {problem}", err=True)
        sys.exit(2 if problems else 0)
    try:
        flusher = loop.run(run_flusher(settings, burst=burst))
    except FlusherError as exc:
        raise click.ClickException(str(exc)) from None
    if burst and flusher is not None and burst_problems(flusher):
        sys.exit(1)  # the reasons are logged


def _moment(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime.datetime | None:
    """A --since/--until value: RFC 3339 with an offset, or epoch milliseconds (like tick ts)."""
    from tickpipe.core.ticks import EPOCH, TickError, parse_ts

    if value is None:
        return None
    try:
        ts_us = parse_ts(int(value) if value.isdigit() else value)
    except TickError as exc:
        raise click.BadParameter(exc.detail.replace("ts ", "", 1), param=param) from None
    return EPOCH + datetime.timedelta(microseconds=ts_us)


@main.command()
@click.option("--burst", is_flag=True, help="Roll up what is queued, then exit.")
@click.option(
    "--backfill",
    is_flag=True,
    help="First queue every second of md_ticks (ticks written before rollups were enabled).",
)
@click.option("--since", callback=_moment, help="With --backfill: from this ts (inclusive).")
@click.option("--until", callback=_moment, help="With --backfill: up to this ts (exclusive).")
@click.option("--widths", default=None, help="Window widths, e.g. 1s,1m [env ROLLUP_WIDTHS].")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on this port [env ROLLUP_METRICS_PORT, default off].",
)
def rollup(
    burst: bool,
    backfill: bool,
    since: datetime.datetime | None,
    until: datetime.datetime | None,
    widths: str | None,
    metrics_port: int | None,
) -> None:
    """Fold committed ticks into OHLCV windows (md_ranges) until SIGTERM/SIGINT.

    Needs `tickpipe schema apply --rollups`. Run as many as you like: they compete.
    """
    from tickpipe.core.settings import parse_widths
    from tickpipe.rollup.run import Backfill, RollupError, run_rollup

    if (since or until) and not backfill:
        raise click.UsageError("--since and --until go with --backfill")
    try:
        widths_s = parse_widths(widths) if widths is not None else None
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint="--widths") from None
    settings = load_settings(rollup_widths_s=widths_s, rollup_metrics_port=metrics_port)
    try:
        loop.run(
            run_rollup(settings, burst=burst, backfill=Backfill(since, until) if backfill else None)
        )
    except RollupError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--ticks", default=4000, show_default=True, help="How many ticks to feed.")
def demo(ticks: int) -> None:
    """Feeder -> ingest -> two flushers (one killed midway) -> Postgres, on the local stack."""
    from tickpipe.lab.demo import run_demo
    from tickpipe.lab.stack import StackError

    try:
        ok = run_demo(load_settings(), ticks=ticks)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if ok else 1)


# -- feeding ------------------------------------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, type=click.Path(allow_dash=True, dir_okay=False))
@click.option(
    "--url",
    envvar="TICKPIPE_URL",
    required=True,
    help="The ingest service, e.g. http://127.0.0.1:8080 [env TICKPIPE_URL].",
)
@click.option(
    "--token", envvar="TICKPIPE_TOKEN", required=True, help="Bearer token [env TICKPIPE_TOKEN]."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "ndjson"]),
    default=None,
    help="Default: by each file's name (.csv, .ndjson, .jsonl; .gz too), else its first line.",
)
@click.option(
    "--columns",
    default="",
    help="CSV columns with other names, as field=column: symbol=ticker,ts=time,price=px.",
)
@click.option("--source", default=None, help="The source of every tick, for CSV without one.")
@click.option("--batch", type=click.IntRange(1, 5000), default=1000, show_default=True)
@click.option("--in-flight", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--give-up-after-s",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="How long a batch is resent while ingest is unreachable or answers 503.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (on stderr).")
def feed(
    files: tuple[str, ...],
    url: str,
    token: str,
    fmt: str | None,
    columns: str,
    source: str | None,
    batch: int,
    in_flight: int,
    give_up_after_s: float,
    no_progress: bool,
) -> None:
    """Send the ticks of FILES (CSV with a header, NDJSON; none or - for stdin) to ingest.

    Ends with a summary; exit 0 only if every tick was accepted.
    """
    from rich.console import Console

    from tickpipe.client.feed import FeedOptions, render
    from tickpipe.client.feed import feed as run_feed
    from tickpipe.client.sources import SourceError, parse_columns

    try:
        mapping = parse_columns(columns)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--columns") from None
    options = FeedOptions(
        url=url,
        token=token,
        files=files or ("-",),
        fmt=fmt,  # type: ignore[arg-type]
        columns=mapping,
        source=source,
        max_batch=batch,
        max_in_flight=in_flight,
        give_up_after_s=give_up_after_s,
        progress=not no_progress,
    )
    try:
        summary = asyncio.run(run_feed(options, Console(stderr=True)))
    except (SourceError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    render(summary, Console(highlight=False, soft_wrap=True))  # a line per line, even in a pipe
    sys.exit(0 if summary.ok else 1)


# -- audit and dead letters -------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (docs/audit.md).")
@click.option(
    "--schema", is_flag=True, help="Print the JSON Schema of the --json report, and exit."
)
@click.option("--verify", is_flag=True, help="Check every acknowledged entry against md_ticks.")
@click.option(
    "--stuck-idle-s",
    type=click.FloatRange(min=0),
    default=None,
    help="Pending longer than this is stuck [default: twice FLUSH_CLAIM_IDLE_S].",
)
@click.option(
    "--stuck-deliveries",
    type=click.IntRange(min=1),
    default=None,
    help="Delivered more often than this is stuck [default: FLUSH_MAX_DELIVERIES].",
)
def audit(
    as_json: bool,
    schema: bool,
    verify: bool,
    stuck_idle_s: float | None,
    stuck_deliveries: int | None,
) -> None:
    """Prove that nothing was lost: exit 0 if so, 1 if not, 2 if a server is unreachable."""
    if schema:
        from tickpipe.ops.audit_report import json_schema_text

        sys.stdout.buffer.write(json_schema_text())
        return
    from tickpipe.ops.audit_run import run_audit

    settings = load_settings()
    limits_idle = stuck_idle_s if stuck_idle_s is not None else 2 * settings.flush_claim_idle_s
    limits_deliveries = stuck_deliveries or settings.flush_max_deliveries
    sys.exit(
        asyncio.run(
            run_audit(
                settings,
                as_json=as_json,
                verify=verify,
                stuck_idle_s=limits_idle,
                stuck_deliveries=limits_deliveries,
            )
        )
    )


@main.group()
def dlq() -> None:
    """Inspect, replay or drop dead-lettered entries (stream ticks.dead)."""


@dlq.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(limit: int, as_json: bool) -> None:
    """Show the oldest dead letters with their reason and original fields."""
    from tickpipe.ops.audit_run import dlq_command

    sys.exit(asyncio.run(dlq_command(load_settings(), "list", limit=limit, as_json=as_json)))


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
def dlq_replay(ids: tuple[str, ...], everything: bool) -> None:
    """Put dead letters back on the stream (atomically: never lost, never doubled)."""
    from tickpipe.ops.audit_run import dlq_command

    if bool(ids) == everything:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    sys.exit(
        asyncio.run(dlq_command(load_settings(), "replay", ids=list(ids), everything=everything))
    )


@dlq.command("drop")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Drop every dead letter.")
@click.option("--yes", is_flag=True, help="Confirm dropping with --all.")
def dlq_drop(ids: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    from tickpipe.ops.audit_run import dlq_command

    if bool(ids) == everything:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    if everything and not yes:
        raise click.UsageError("--all deletes every dead letter for good: add --yes to confirm")
    sys.exit(
        asyncio.run(dlq_command(load_settings(), "drop", ids=list(ids), everything=everything))
    )


@main.group()
def shards() -> None:
    """The deployment's STREAM_SHARDS, recorded in Redis (docs/scaling.md)."""


@shards.command("show")
def shards_show() -> None:
    """Show the recorded shape, this environment's, and streams outside the shard map."""
    from tickpipe.ops.audit_run import shards_command

    sys.exit(asyncio.run(shards_command(load_settings(), None)))


@shards.command("set")
@click.argument("count", type=click.IntRange(1, MAX_SHARDS))
def shards_set(count: int) -> None:
    """Change the deployment to COUNT shards, once every stream is drained.

    Stop ingest first and let the flushers (with the old STREAM_SHARDS) empty
    the streams; this refuses while any stream still holds undelivered or
    pending entries, or dead letters.
    """
    from tickpipe.ops.audit_run import shards_command

    sys.exit(asyncio.run(shards_command(load_settings(), count)))


# -- reliability ------------------------------------------------------------------------


@main.command()
@click.option("--seed", type=int, default=1, show_default=True, help="Makes the run reproducible.")
@click.option("--ticks", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--faults-per-kind", type=click.IntRange(min=0), default=3, show_default=True)
@click.option(
    "--kinds",
    default="all",
    show_default=True,
    help="Comma-separated fault kinds (listed in docs/reliability.md), or 'all'.",
)
@click.option("--durability", type=click.Choice(["fsync", "everysec"]), default="fsync")
@click.option("--feeders", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--flushers", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--no-fuzz", is_flag=True, help="No bad requests alongside the traffic.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(".tickpipe-chaos"),
    show_default=True,
    help="Wiped at the start: the run gets its own servers.",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def chaos(
    seed: int,
    ticks: int,
    faults_per_kind: int,
    kinds: str,
    durability: str,
    feeders: int,
    flushers: int,
    no_fuzz: bool,
    state_dir: Path,
    json_out: Path | None,
) -> None:
    """Faults at seeded random moments, then proof that no acknowledged tick was lost."""
    import json

    from rich.console import Console

    from tickpipe.lab.chaos import FAULT_KINDS, ChaosConfig, passed, render, run_chaos

    settings = load_settings()
    chosen = FAULT_KINDS if kinds == "all" else tuple(k.strip() for k in kinds.split(","))
    unknown = set(chosen) - set(FAULT_KINDS)
    if unknown:
        raise click.UsageError(
            f"unknown fault kinds: {', '.join(sorted(unknown))}; known: {', '.join(FAULT_KINDS)}"
        )
    config = ChaosConfig(
        state_dir=state_dir,
        seed=seed,
        ticks=ticks,
        faults_per_kind=faults_per_kind,
        kinds=chosen,
        durability=durability,
        feeders=feeders,
        flushers=flushers,
        fuzz=not no_fuzz,
        embedded_only=settings.stack_embedded_only,
        redis_server=settings.stack_redis_server,
        appendfsync=settings.stack_appendfsync,
    )
    console = Console(stderr=True)
    result = _guarded(run_chaos(config, console), "chaos")
    render(result, console)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    ok = passed(result)
    console.print("[bold green]PASS[/]: zero lost" if ok else "[bold red]FAIL[/]")
    sys.exit(0 if ok else 1)


def _guarded(run: Coroutine[Any, Any, T], name: str) -> T:
    """Run ``run`` (chaos, bench) so that any stop leaves nothing behind, and exits clearly.

    SIGTERM/SIGINT cancel it: its own cleanup stops every process and server it
    started, then this exits 128+signal. A run that cannot make progress exits 2
    with the reason.
    """
    from tickpipe.core.signals import Stopped, cancel_on_signal
    from tickpipe.lab.stack import StackError
    from tickpipe.lab.stall import EXIT_STALLED, Stalled

    try:
        return asyncio.run(cancel_on_signal(run))
    except Stalled as exc:
        click.echo(f"tickpipe {name}: stopped: {exc}", err=True)
        sys.exit(EXIT_STALLED)
    except StackError as exc:
        click.echo(f"tickpipe {name}: cannot start the servers: {exc}", err=True)
        sys.exit(EXIT_STALLED)
    except Stopped as exc:
        click.echo(
            f"tickpipe {name}: {exc}; every process and server it started is stopped", err=True
        )
        sys.exit(128 + exc.signum)


@main.command()
@click.option("--duration-s", type=click.FloatRange(min=1), default=8.0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--flushers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--connections", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--shards",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Above 1: how throughput grows with shards and flushers, on a local Redis Cluster.",
)
@click.option(
    "--drain-entries",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Backlog the flushers drain in the drain-rate run.",
)
@click.option(
    "--ceiling-rows",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Rows and entries of the COPY and XADD ceilings.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(".tickpipe-bench"),
    show_default=True,
    help="Wiped at the start: the bench gets its own servers.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench"), show_default=True,
              help="Writes OUT.json and OUT.png.")  # fmt: skip
@click.option(
    "--read",
    is_flag=True,
    help="The read API and the SSE push instead: latest, history, a paged range, and ingest"
    " with and without 100 event-stream clients (needs wrk).",
)
@click.option(
    "--read-rows",
    type=click.IntRange(min=2000),
    default=200_000,
    show_default=True,
    help="With --read: ticks over 100 symbols, and a twentieth as many in the paged range.",
)
@click.option(
    "--baseline",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --read: an earlier --read run's JSON; each figure is also shown against it.",
)
@click.option(
    "--loader",
    type=click.Choice(["wrk", "python"]),
    default=None,
    help="Load generator: wrk (C, less CPU) or the Python one. Default: wrk when it is on PATH."
    " Open-loop runs at a fixed rate always use the Python one.",
)
def bench(
    duration_s: float,
    workers: int,
    flushers: int,
    connections: int,
    shards: int,
    drain_entries: int,
    ceiling_rows: int,
    state_dir: Path,
    out: Path,
    read: bool,
    read_rows: int,
    baseline: Path | None,
    loader: Loader | None,
) -> None:
    """Throughput and latency against the per-tick INSERT baseline and the raw ceilings."""
    import json

    from rich.console import Console

    from tickpipe.lab.bench import BenchConfig, chart, render, run_bench
    from tickpipe.lab.bench_wrk import INSTALL_HINT, default_loader

    if loader is None:
        loader = default_loader()
        if loader == "python":
            click.echo(
                "tickpipe bench: wrk is not on PATH, the load comes from the Python loader,"
                f" which takes more CPU ({INSTALL_HINT} to use wrk)",
                err=True,
            )
    elif loader == "wrk" and default_loader() != "wrk":
        raise click.UsageError(f"--loader wrk: wrk is not on PATH ({INSTALL_HINT})")

    settings = load_settings()
    config = BenchConfig(
        state_dir=state_dir,
        duration_s=duration_s,
        workers=workers,
        flushers=flushers,
        connections=connections,
        drain_entries=drain_entries,
        ceiling_rows=ceiling_rows,
        embedded_only=settings.stack_embedded_only,
        redis_server=settings.stack_redis_server,
        durability=settings.ingest_durability,
        appendfsync=settings.stack_appendfsync,
        loader=loader,
    )
    # Into a file or a pipe, rich would wrap the tables at 80 columns: cell by cell.
    console = Console(width=None if sys.stdout.isatty() else 200)
    if read:
        if loader != "wrk":
            raise click.UsageError(f"--read needs wrk ({INSTALL_HINT})")
        from tickpipe.lab.bench_read import ReadData, load_baseline, render_read, run_read_bench

        reading = run_read_bench(
            config, Console(stderr=True), load_baseline(baseline), ReadData(read_rows)
        )
        found = _guarded(reading, "bench")
        render_read(found, console)
        out.with_suffix(".json").write_text(json.dumps(found, indent=2) + "\n")
        click.echo(f"wrote {out.with_suffix('.json')}", err=True)
        return
    if shards > 1:
        from tickpipe.lab.bench_scale import render_scale, run_scale

        scaled = _guarded(run_scale(config, shards, Console(stderr=True)), "bench")
        render_scale(scaled, console)
        out.with_suffix(".json").write_text(json.dumps(scaled, indent=2) + "\n")
        click.echo(f"wrote {out.with_suffix('.json')}", err=True)
        return
    results = _guarded(run_bench(config, Console(stderr=True)), "bench")
    render(results, console)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        chart(results, out.with_suffix(".png"))
    except ImportError:
        click.echo(
            "matplotlib is not installed: no chart (pip install 'tickpipe[bench]')", err=True
        )
    click.echo(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", err=True)
