"""`tickpipe bench --loader wrk`: the load from wrk (C), so it takes less of the cores.

wrk runs ``bench_wrk.lua``: every request carries ticks with unique (symbol, ts)
keys, single ticks to /ingest/tick or arrays to /ingest/ticks. Its report has
the fields of :mod:`tickpipe.lab.bench_load`'s, without the per-second timeline.
wrk has no rate control: open-loop runs (``--rate``) stay with the Python loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Literal

from tickpipe.lab.stall import STALL_AFTER_S, Stalled, reaped

Loader = Literal["wrk", "python"]

SCRIPT = Path(__file__).with_name("bench_wrk.lua")
REPORT_PREFIX = "tickpipe-wrk-report "
STALLED_LINE = "tickpipe-wrk stalled"
INSTALL_HINT = "apt-get install wrk"


def default_loader() -> Loader:
    """wrk when it is on PATH, else the Python loader."""
    return "wrk" if shutil.which("wrk") else "python"


def statuses_of(report: dict[str, Any]) -> dict[str, int]:
    """Answers by HTTP status, then the requests that got none, by wrk's error kind."""
    found = {str(status): n for status, n in sorted(report["statuses"].items())}
    for kind in ("connect", "read", "write", "timeout"):
        if report["errors"][kind]:
            found[f"{kind} error"] = report["errors"][kind]
    return found


async def run_wrk(
    url: str,
    *,
    token: str,
    mode: str,
    batch: int,
    duration_s: float,
    connections: int,
    start_ts_ms: int,
    log_path: Path,
    paths: Path | None = None,
    symbols: int = 64,
) -> dict[str, Any]:
    """One wrk run against ingest at ``url``; the report of :mod:`tickpipe.lab.bench_load`.

    ``mode`` "get" sends GETs of the paths in the file ``paths`` in turn, and
    counts requests answered 2xx as the "ticks" of the report.
    """
    path = {"single": "/ingest/tick", "batch": "/ingest/ticks", "get": "/"}[mode]
    per_request = batch if mode == "batch" else 1
    first = str(paths) if mode == "get" else str(batch)
    proc = await asyncio.create_subprocess_exec(
        "wrk", "--threads", "1", "--connections", str(connections),
        "--duration", f"{max(1, round(duration_s))}s",
        "--timeout", f"{math.ceil(STALL_AFTER_S)}s",
        "--script", str(SCRIPT), url + path,
        "--", mode, first, str(start_ts_ms), str(STALL_AFTER_S), str(symbols),
        env={**os.environ, "TICKPIPE_BENCH_TOKEN": token},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    errors: list[str] = []

    async def watch_stderr(stream: asyncio.StreamReader) -> None:
        # The script says when it stalls; wrk itself would run out its duration.
        while line := (await stream.readline()).decode(errors="replace"):
            if line.strip() == STALLED_LINE:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)  # wrk reports what it has, then exits
            else:
                errors.append(line)

    async with reaped(proc):
        out, _ = await asyncio.gather(proc.stdout.read(), watch_stderr(proc.stderr))
        await proc.wait()
    text = out.decode(errors="replace")
    with log_path.open("a") as log:
        log.write(text + "".join(errors))
    line = next((x for x in text.splitlines() if x.startswith(REPORT_PREFIX)), None)
    if line is None:
        detail = " | ".join(x.strip() for x in (text.splitlines() + errors)[-5:] if x.strip())
        raise Stalled(f"wrk exited with code {proc.returncode} and no report: {detail}")
    raw: dict[str, Any] = json.loads(line.removeprefix(REPORT_PREFIX))
    statuses = statuses_of(raw)
    acknowledged = sum(n for status, n in raw["statuses"].items() if 200 <= int(status) < 300)
    elapsed = raw["duration_us"] / 1e6
    stalled = raw["stalled"]
    if not acknowledged and not stalled:
        stalled = f"no tick acknowledged for {elapsed:.0f} s (the whole wrk run)"
    if stalled:
        stalled += f"; answers {statuses}; last refusal: {raw['last_refusal'] or '-'}"
    accepted = acknowledged * per_request
    return {
        "loader": "wrk",
        "stalled": stalled,
        "mode": mode,
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "errors": raw["errors"],
        "accepted_ticks": accepted,
        "elapsed_s": round(elapsed, 3),
        "ticks_per_s": round(accepted / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            pct: None if us is None else round(us / 1000, 3)
            for pct, us in raw["latency_us"].items()
        },
    }
