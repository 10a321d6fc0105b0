"""The CI version of `tickpipe chaos`: every fault kind, a few times, zero loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.services


def chaos(tmp_path: Path, *args: str) -> dict[str, object]:
    result_file = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "tickpipe", "chaos",
            "--state-dir", str(tmp_path / "chaos"), "--json-out", str(result_file), *args,
        ],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, object] = json.loads(result_file.read_text())
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
    assert len(faults) == 6
    assert all(count == 2 for count in faults.values())


def test_fsync_mode_survives_redis_kill_9(tmp_path: Path) -> None:
    result = chaos(
        tmp_path,
        "--seed", "11", "--ticks", "4000", "--kinds", "redis_kill9", "--faults-per-kind", "4",
        "--durability", "fsync", "--no-fuzz",
    )  # fmt: skip
    assert result["faults"] == {"redis_kill9": 4}
    assert result["lost"] == 0
    assert result["acknowledged"] == 4000
