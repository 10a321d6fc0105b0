"""A test session stopped with SIGTERM (a CI timeout) stops every server it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.processes import leftovers

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[1]

INNER_TEST = """
import json, os, time
from pathlib import Path

def test_holds_its_servers(stack, redis_cluster):
    dirs = [str(stack.state_dir), str(redis_cluster.state_dir)]
    Path(os.environ["TICKPIPE_READY_FILE"]).write_text(json.dumps(dirs))
    time.sleep(600)  # until the SIGTERM
"""


def test_sigterm_to_the_test_session_stops_its_servers(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    # The project's own fixtures and its SIGTERM handling, in a session of its own.
    (inner / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
    ready = tmp_path / "ready.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TICKPIPE_READY_FILE": str(ready),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(inner), "-q", "-p", "no:cacheprovider",
         "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
         "--basetemp", str(tmp_path / "basetemp")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), proc.stdout.read() if proc.poll() is not None else "not ready"
        dirs = [Path(d) for d in json.loads(ready.read_text())]
        assert all(leftovers(d) for d in dirs)  # the servers run
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in output, output[-3000:]
    for directory in dirs:
        assert leftovers(directory) == [], output[-3000:]
