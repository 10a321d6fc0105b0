"""Smoke test of `tickpipe bench`: it runs and writes its report. No timing is asserted:
performance is shown by the benchmark itself, never by a test."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.processes import leftovers, run_to_end
from tickpipe.cli import main
from tickpipe.lab import bench_wrk
from tickpipe.lab.bench import redis_report

# Only the load generators this machine has: the suite skips none.
LOADERS = ["python", *(["wrk"] if shutil.which("wrk") else [])]


@pytest.mark.services
@pytest.mark.parametrize("loader", LOADERS)
def test_bench_produces_its_report(tmp_path: Path, loader: str) -> None:
    out = tmp_path / "bench"
    run = run_to_end(
        [
            sys.executable, "-m", "tickpipe", "bench", "--loader", loader,
            "--duration-s", "1", "--drain-entries", "3000", "--ceiling-rows", "3000",
            "--state-dir", str(tmp_path / "state"), "--out", str(out),
        ],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    for key in (
        "xadd_ceiling", "copy_ceiling", "bare_single", "direct_single",
        "tickpipe_single", "tickpipe_batch", "tickpipe_half_rate", "drain",
    ):  # fmt: skip
        assert key in results
    assert results["tickpipe_batch"]["accepted_ticks"] > 0
    assert results["tickpipe_batch"]["committed_rows_per_s"] > 0
    assert set(results["ratios"]) >= {"batch_e2e_vs_direct", "drain_vs_copy_ceiling"}
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "ratios (same run)" in run.stdout
    assert "CPU per tick" in run.stdout
    drain = results["cpu_budget"]["drain"]
    assert set(drain["cpu_us_per_tick"]) == {"flushers", "redis", "postgres"}
    assert drain["cpu_us_per_tick"]["flushers"] > 0
    assert set(results["cpu_budget"]["tickpipe_batch"]["cpu_us_per_tick"]) == {
        "ingest", "flushers", "redis", "postgres", "load"
    }  # fmt: skip
    # Which loader ran each row: wrk cannot hold a rate, the 50% row is the Python loader's.
    assert results["config"]["loader"] == loader
    for key in ("bare_single", "direct_single", "tickpipe_single", "tickpipe_batch"):
        assert results[key]["loader"] == loader
        assert set(results[key]["latency_ms"]) == {"p50", "p95", "p99"}
        assert results[key]["statuses"] == {"200": results[key]["requests"]}
    assert results["tickpipe_half_rate"]["loader"] == "python"
    assert ("timeline" in results["tickpipe_batch"]) == (loader == "python")
    assert f"load generator: {'wrk' if loader == 'wrk' else 'Python'}" in run.stdout
    # Redis calls per accepted tick, by command, and XREADGROUP per committed batch.
    for key in ("tickpipe_single", "tickpipe_batch"):
        calls = results[key]["redis_calls_per_tick"]
        assert {"XADD", "XREADGROUP", "XACK"} <= set(calls["by_command"])
        assert set(calls["by_command"]) & {"EVALSHA", "EVAL", "FCALL"}
        assert calls["total"] >= sum(calls["by_command"].values()) - 0.01
        assert results[key]["batches"] > 0
        assert results[key]["xreadgroup_per_batch"] > 0
    assert results["bare_single"]["redis_calls_per_tick"]["by_command"]["XADD"] == pytest.approx(
        1.0, abs=0.05
    )
    assert results["drain"]["redis_calls_per_tick"]["by_command"]["XREADGROUP"] > 0
    # Nothing talks to Redis while the direct endpoint runs: the bench's own INFO is left out.
    assert results["direct_single"]["redis_commands"] == {}
    assert results["drain"]["xreadgroup_per_batch"] is None
    budget = results["cpu_budget"]["tickpipe_batch"]
    calls = results["tickpipe_batch"]["redis_calls_per_tick"]
    assert budget["redis_calls_per_tick"] == calls["total"]
    assert "Redis calls per tick" in run.stdout
    assert "XREADGROUP/batch" in run.stdout


@pytest.mark.services
def test_bench_shards_reports_each_shape(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    run = run_to_end(
        [
            sys.executable, "-m", "tickpipe", "bench", "--shards", "2", "--flushers", "1",
            "--duration-s", "1", "--drain-entries", "2000",
            "--state-dir", str(tmp_path / "state"), "--out", str(out),
        ],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(r["shards"], r["flushers"]) for r in results["runs"]] == [(1, 1), (2, 1), (2, 2)]
    for shape in results["runs"]:
        assert shape["drain_rows_per_s"] > 0
        assert shape["batch_committed_rows_per_s"] > 0
    assert results["runs"][0]["drain_vs_1x1"] == 1.0
    assert all(shape["redis_calls_per_tick"] > 0 for shape in results["runs"])
    assert all(shape["xreadgroup_per_batch"] > 0 for shape in results["runs"])
    assert "tickpipe bench --shards" in run.stdout


@pytest.mark.services
@pytest.mark.parametrize("loader", LOADERS)
def test_bench_stops_with_exit_2_when_ingest_refuses_everything(
    tmp_path: Path, loader: str
) -> None:
    # Every POST is over the body limit: ingest answers 413 to all of them.
    state = tmp_path / "state"
    run = run_to_end(
        [
            sys.executable, "-m", "tickpipe", "bench", "--loader", loader,
            "--duration-s", "11", "--drain-entries", "1000", "--ceiling-rows", "1000",
            "--state-dir", str(state), "--out", str(tmp_path / "bench"),
        ],
        env={"INGEST_MAX_BODY_BYTES": "10"},
        timeout_s=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "no tick acknowledged for" in run.stderr
    assert "too_large" in run.stderr
    assert "413" in run.stderr
    assert leftovers(state) == []


def test_bench_loader_wrk_needs_wrk_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_wrk.shutil, "which", lambda _name: None)
    result = CliRunner().invoke(main, ["bench", "--loader", "wrk"])
    assert result.exit_code == 2
    assert "wrk is not on PATH (apt-get install wrk)" in result.output


def test_redis_report_divides_by_accepted_ticks_and_committed_batches() -> None:
    calls = {
        "EVALSHA": {"calls": 40, "usec": 800},
        "XADD": {"calls": 1000, "usec": 900},
        "XREADGROUP": {"calls": 30, "usec": 300},
        "XACK": {"calls": 10, "usec": 50},
    }
    report = redis_report(calls, ticks=1000, batches=10)
    assert report["redis_calls_per_tick"] == {
        "total": 1.08,
        "by_command": {"EVALSHA": 0.04, "XADD": 1.0, "XREADGROUP": 0.03, "XACK": 0.01},
    }
    assert report["xreadgroup_per_batch"] == 3.0
    assert redis_report(calls, ticks=1000, batches=None)["xreadgroup_per_batch"] is None


def test_wrk_statuses_name_answers_and_failed_requests() -> None:
    raw = {"statuses": {"413": 5, "200": 7},
           "errors": {"connect": 2, "read": 0, "write": 0, "status": 5, "timeout": 1}}  # fmt: skip
    assert bench_wrk.statuses_of(raw) == {
        "200": 7, "413": 5, "connect error": 2, "timeout error": 1
    }  # fmt: skip


@pytest.mark.services
def test_bench_read_reports_queries_and_the_sse_fan_out(tmp_path: Path) -> None:
    out = tmp_path / "read"
    run = run_to_end(
        [
            sys.executable, "-m", "tickpipe", "bench", "--read", "--read-rows", "4000",
            "--duration-s", "1", "--workers", "2",
            "--state-dir", str(tmp_path / "state"), "--out", str(out),
        ],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["data"] == {"rows": 4200, "symbols": 101, "range_rows": 200, "page": 20}
    for key in ("latest", "history", "range"):
        assert results[key]["requests_per_s"] > 0
        assert results[key]["component_cpu_s"]["postgres"] >= 0
    assert results["range"]["pages_per_range"] == 10
    sse = results["sse"]
    assert sse["clients"] == 100
    assert sse["events_delivered"] > 0
    assert sse["clients_ended_by_server"] == 0
    assert sse["without_clients"]["ticks_per_s"] > 0
    assert sse["with_clients"]["ticks_per_s"] > 0
    assert sse["paced"]["events_delivered"] > 0
    assert set(sse["cpu_us_per_event"]) == {"ingest", "redis", "sse clients"}
    assert results["vs_baseline"] is None
    assert "tickpipe bench --read: queries" in run.stdout
    assert "SSE push" in run.stdout
    # An earlier run as the baseline: every figure against it.
    again = run_to_end(
        [
            sys.executable, "-m", "tickpipe", "bench", "--read", "--read-rows", "2000",
            "--duration-s", "1", "--baseline", str(out.with_suffix(".json")),
            "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "again"),
        ],
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    compared = json.loads((tmp_path / "again.json").read_text())["vs_baseline"]
    assert compared["history req/s"] > 0
    assert "history vs baseline" in again.stdout


def test_bench_read_needs_wrk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_wrk.shutil, "which", lambda _name: None)
    result = CliRunner().invoke(main, ["bench", "--read"])
    assert result.exit_code == 2
    assert "--read needs wrk" in result.output
