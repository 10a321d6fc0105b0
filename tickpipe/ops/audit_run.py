"""Running `tickpipe audit`, `dlq` and `shards`: connections, output, exit status."""

from __future__ import annotations

import sys
from typing import Any

import asyncpg
import msgspec
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tickpipe.core import redis_conn, shape
from tickpipe.core.settings import Settings
from tickpipe.ops.audit import Thresholds, problems, stream_report, verify
from tickpipe.ops.audit_report import AuditReport, VerifyReport
from tickpipe.ops.audit_view import render
from tickpipe.ops.dlq import AmbiguousDeadLetter, DeadLetters

OK, NOT_OK, UNREACHABLE = 0, 1, 2
_json = msgspec.json.Encoder()


_UNREACHABLE: tuple[type[Exception], ...] = (*redis_conn.UNAVAILABLE, OSError)


async def _open(settings: Settings, client_name: str) -> tuple[redis_conn.RedisClient, Settings]:
    """A client that has answered once (an unreachable Redis shows here, not midway),
    and the settings with ``redis_cluster`` now known."""
    redis = await redis_conn.open_client(
        settings.redis_url, settings.redis_cluster, client_name=client_name
    )
    try:
        await redis.ping()
    except BaseException:
        await redis.aclose()
        raise
    try:
        return redis, redis_conn.settings_for(settings, redis)
    except BaseException:
        await redis.aclose()
        raise


async def _open_or_say(
    settings: Settings, client_name: str
) -> tuple[redis_conn.RedisClient, Settings] | None:
    """:func:`_open`, or None after saying why Redis cannot be used (exit UNREACHABLE)."""
    try:
        return await _open(settings, client_name)
    except _UNREACHABLE as exc:
        _say(f"cannot reach Redis at REDIS_URL: {exc}")
    except redis_conn.RedisConfigError as exc:
        _say(f"configuration: {exc}")
    return None


def _say(message: str) -> None:
    print(f"tickpipe: {message}", file=sys.stderr, flush=True)


async def run_audit(
    settings: Settings, *, as_json: bool, verify: bool, stuck_idle_s: float, stuck_deliveries: int
) -> int:
    opened = await _open_or_say(settings, "tickpipe-audit")
    if opened is None:
        return UNREACHABLE
    redis, settings = opened
    try:
        try:
            report = await stream_report(
                redis, settings, Thresholds(stuck_idle_s, stuck_deliveries)
            )
        except _UNREACHABLE as exc:
            _say(f"cannot reach Redis at REDIS_URL: {exc}")
            return UNREACHABLE
        if verify:
            try:
                conn = await asyncpg.connect(settings.database_url, timeout=10)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                _say(f"cannot reach Postgres at DATABASE_URL: {exc}")
                return UNREACHABLE
            try:
                report.verify = await _verify_with_progress(redis, conn, settings, report)
            finally:
                await conn.close()
    finally:
        await redis.aclose()
    report.problems = problems(report)
    report.ok = not report.problems
    if as_json:
        sys.stdout.buffer.write(_json.encode(report) + b"\n")
        sys.stdout.flush()
    else:
        render(report, Console(highlight=False))
    return OK if report.ok else NOT_OK


async def _verify_with_progress(
    redis: Any, conn: asyncpg.Connection, settings: Settings, report: AuditReport
) -> VerifyReport:
    progress = Progress(
        TextColumn("verifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task("verify", total=report.stream.length)
        return await verify(redis, conn, settings, lambda n: progress.advance(task, n))


async def dlq_command(
    settings: Settings,
    action: str,
    *,
    ids: list[str] | None = None,
    everything: bool = False,
    limit: int = 20,
    as_json: bool = False,
) -> int:
    opened = await _open_or_say(settings, "tickpipe-dlq")
    if opened is None:
        return UNREACHABLE
    redis, settings = opened
    letters = DeadLetters(redis, settings.shard_map.shards)
    try:
        if action == "list":
            found = await letters.oldest(limit)
            if as_json:
                sys.stdout.buffer.write(_json.encode(found) + b"\n")
            else:
                for letter in found:
                    fields = " ".join(f"{k}={v}" for k, v in letter["fields"].items())
                    print(
                        f"{letter['id']}  was {letter['original_id']}"
                        f"  deliveries={letter['deliveries']}  {letter['reason']}\n    {fields}"
                    )
                print(f"{len(found)} shown", file=sys.stderr)
            return OK
        targets = await letters.all_ids() if everything else ids or []
        if action == "replay":
            replayed = await letters.replay(targets)
            missing = [dead_id for dead_id, new_id in replayed.items() if new_id is None]
            for dead_id, new_id in replayed.items():
                if new_id:
                    print(f"replayed {dead_id} as {new_id}")
            for dead_id in missing:
                _say(f"no dead letter {dead_id}")
            return NOT_OK if missing else OK
        dropped = await letters.drop(targets)
        print(f"dropped {dropped} dead letters")
        return OK if dropped == len(targets) else NOT_OK
    except AmbiguousDeadLetter as exc:
        _say(f"{exc}; nothing was changed")
        return NOT_OK
    except _UNREACHABLE as exc:
        _say(f"cannot reach Redis at REDIS_URL: {exc}")
        return UNREACHABLE
    except RedisError as exc:
        _say(f"Redis refused: {exc}")
        return NOT_OK
    finally:
        await redis.aclose()


async def shards_command(settings: Settings, count: int | None) -> int:
    """Show the deployment's shape (``count`` None), or change it to ``count`` shards."""
    opened = await _open_or_say(settings, "tickpipe-shards")
    if opened is None:
        return UNREACHABLE
    redis, settings = opened
    try:
        if count is None:
            deployed = await shape.recorded(redis, settings.stream_name)
            print(f"recorded: {deployed.describe() if deployed else 'nothing yet'}")
            print(f"configured here: {shape.Shape.of(settings).describe()}")
            for left in await shape.stranded(redis, settings, keep=shape.current_names(settings)):
                print(f"outside the shard map: {left.describe()}")
            return OK
        old, new = await shape.change(redis, settings, count)
    except redis_conn.RedisConfigError as exc:
        _say(str(exc))
        return NOT_OK
    except _UNREACHABLE as exc:
        _say(f"cannot reach Redis at REDIS_URL: {exc}")
        return UNREACHABLE
    finally:
        await redis.aclose()
    if old == new:
        print(f"the deployment already runs {new.describe()}")
    else:
        print(
            f"the deployment now runs {new.describe()} (was"
            f" {old.describe() if old else 'not recorded'}): start ingest and the flushers"
            f" with STREAM_SHARDS={new.shards}"
        )
    return OK
