"""Smoke test of `tickpipe bench`: it runs and writes its report. No timing is asserted:
performance is shown by the benchmark itself, never by a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import leftovers, run_to_end

pytestmark = pytest.mark.services


def test_bench_produces_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable, "-m", "tickpipe", "bench",
            "--duration-s", "1", "--drain-entries", "3000", "--ceiling-rows", "3000",
            "--state-dir", str(tmp_path / "state"), "--out", str(out),
        ],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
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


def test_bench_shards_reports_each_shape(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    run = subprocess.run(
        [
            sys.executable, "-m", "tickpipe", "bench", "--shards", "2", "--flushers", "1",
            "--duration-s", "1", "--drain-entries", "2000",
            "--state-dir", str(tmp_path / "state"), "--out", str(out),
        ],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(r["shards"], r["flushers"]) for r in results["runs"]] == [(1, 1), (2, 1), (2, 2)]
    for shape in results["runs"]:
        assert shape["drain_rows_per_s"] > 0
        assert shape["batch_committed_rows_per_s"] > 0
    assert results["runs"][0]["drain_vs_1x1"] == 1.0
    assert "tickpipe bench --shards" in run.stdout


def test_bench_stops_with_exit_2_when_ingest_refuses_everything(tmp_path: Path) -> None:
    # Every POST is over the body limit: ingest answers 413 to all of them.
    state = tmp_path / "state"
    run = run_to_end(
        [
            sys.executable, "-m", "tickpipe", "bench",
            "--duration-s", "11", "--drain-entries", "1000", "--ceiling-rows", "1000",
            "--state-dir", str(state), "--out", str(tmp_path / "bench"),
        ],
        env={"INGEST_MAX_BODY_BYTES": "10"},
        timeout_s=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "no tick acknowledged for" in run.stderr
    assert "too_large" in run.stderr
    assert leftovers(state) == []
