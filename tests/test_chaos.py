"""The CI version of `tickpipe chaos`: every fault kind, a few times, zero loss.

Also: chaos stops at once when ingest refuses everything, and a chaos run
stopped by SIGTERM leaves no process or server behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_SERVERS, server_id
from tests.processes import alive, descendants, leftovers, read_pid, run_to_end
from tickpipe.lab.stack import RedisServer

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


def chaos_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "tickpipe", "chaos",
        "--state-dir", str(tmp_path / "chaos"), "--json-out", str(tmp_path / "result.json"),
        *args,
    ]  # fmt: skip


def run_chaos(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    return run_to_end(chaos_command(tmp_path, *args), env=env, timeout_s=timeout_s)


def chaos(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    run = run_chaos(tmp_path, *args, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, object] = json.loads((tmp_path / "result.json").read_text())
    return result


def test_every_fault_kind_loses_nothing(tmp_path: Path) -> None:
    result = chaos(tmp_path, "--seed", "7", "--ticks", "6000", "--faults-per-kind", "2")
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    assert result["acknowledged"] == 6000
    assert result["rows_in_md_ticks"] == 6000
    assert result["still_pending"] == 0
    assert result["fuzz_5xx"] == 0
    assert result["fuzz_rows_written"] == 0
    assert result["audit_ok"] is True
    faults = result["faults"]
    assert isinstance(faults, dict)
    assert len(faults) == 7
    assert all(count == 2 for count in faults.values())
    recovery = result["recovery_after_kill9"]
    assert isinstance(recovery, dict)
    assert len(recovery["kills"]) == 2
    assert recovery["not_recovered"] == 0
    print(f"recovery after flusher_kill9: {recovery}; late commits: {result['late_commits']}")


@pytest.mark.parametrize("server", REDIS_SERVERS, ids=server_id)
def test_fsync_mode_survives_redis_kill_9(tmp_path: Path, server: RedisServer) -> None:
    """On each kind of Redis: WAITAOF, or appendfsync always where there is none."""
    result = chaos(
        tmp_path,
        "--seed", "11", "--ticks", "4000", "--kinds", "redis_kill9", "--faults-per-kind", "4",
        "--durability", "fsync", "--no-fuzz",
        env={"TICKPIPE_REDIS_SERVER": server.path},
    )  # fmt: skip
    assert result["faults"] == {"redis_kill9": 4}
    assert result["lost"] == 0
    assert result["acknowledged"] == 4000
    assert result["rows_in_md_ticks"] == 4000


REFUSALS = [
    # Every feeder request (50 ticks) is over the batch limit: ingest answers 413 to all.
    pytest.param({"INGEST_MAX_BATCH": "10"}, "413", id="every-request-413"),
    # A Redis without WAITAOF run with appendfsync everysec: ingest refuses to start.
    *(
        pytest.param(
            {"TICKPIPE_REDIS_SERVER": s.path, "TICKPIPE_REDIS_APPENDFSYNC": "everysec"},
            f"{s.label} at",
            id=f"fsync-on-{server_id(s)}-everysec",
        )
        for s in REDIS_SERVERS
        if not s.has_waitaof
    ),
]


@pytest.mark.parametrize(("env", "reason"), REFUSALS)
def test_stops_with_exit_2_and_the_reason_when_ingest_refuses_everything(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    started = time.monotonic()
    run = run_chaos(
        tmp_path,
        "--seed", "5", "--ticks", "20000", "--faults-per-kind", "3", "--no-fuzz",
        env=env,
        timeout_s=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert run.returncode == 2, run.stderr[-3000:]
    assert reason in run.stderr
    print(f"chaos stopped {elapsed:.1f} s after its start: {run.stderr.strip()[-300:]}")
    assert not leftovers(tmp_path / "chaos")


def test_sigterm_after_redis_kill9_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "chaos"
    pidfile = state / "stack" / "redis" / "redis.pid"
    proc = subprocess.Popen(
        chaos_command(
            tmp_path,
            *("--seed", "3", "--ticks", "200000", "--kinds", "redis_kill9"),
            *("--faults-per-kind", "30", "--no-fuzz"),
        ),
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: list[int] = []
    try:
        first = restarted = None
        deadline = time.monotonic() + 120
        while restarted is None and time.monotonic() < deadline and proc.poll() is None:
            started.extend(p for p in descendants(proc.pid) if p not in started)
            pid = read_pid(pidfile)
            if first is None:
                first = pid
            elif pid is not None and pid != first and alive(pid):
                restarted = pid  # a Redis restarted after a redis_kill9 fault
            time.sleep(0.05)
        assert restarted is not None, "no redis_kill9 fault within 120 s"
        started.extend(p for p in descendants(proc.pid) if p not in started)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err
    assert not alive(restarted)
    assert [pid for pid in started if alive(pid)] == []
    assert not leftovers(state)
