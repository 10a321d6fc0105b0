"""`tickpipe ingest --workers N`: N processes serving one port.

Each worker binds the port with SO_REUSEPORT and the kernel spreads new
connections over them. This supervisor starts the workers, restarts one that
dies (with backoff), and on SIGTERM/SIGINT passes the signal on and waits for
the workers to finish their in-flight requests. Metrics of all workers are
aggregated through PROMETHEUS_MULTIPROC_DIR. A supervisor killed outright
(SIGKILL, OOM killer) takes its workers with it on Linux: they get SIGTERM,
finish their requests and free the port, rather than serve on unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from tickpipe.core.backoff import Backoff
from tickpipe.core.settings import Settings

log = logging.getLogger("tickpipe.ingest")

EXIT_CONFIG = 78
"""A worker's exit status for an error no restart can fix (sysexits' EX_CONFIG):
the port cannot be bound, Redis is not what REDIS_CLUSTER says."""


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._stopping = False
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._metrics_dir: Path | None = None
        self._status = 0

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        own_dir = self.settings.prometheus_multiproc_dir is None
        metrics_dir = (
            Path(tempfile.mkdtemp(prefix="tickpipe-metrics-"))
            if own_dir
            else self.settings.prometheus_multiproc_dir
        )
        assert metrics_dir is not None
        _wipe(metrics_dir)
        self._metrics_dir = metrics_dir
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for slot in range(self.workers):
                self._start(slot, env)
            log.info(
                "ingest: %d workers on http://%s:%d",
                self.workers,
                self.settings.ingest_host,
                self.settings.ingest_port,
            )
            self._watch(env)
        finally:
            self._stop_all()
            if own_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return self._status

    def _start(self, slot: int, env: dict[str, str]) -> None:
        command = [
            sys.executable,
            "-m",
            "tickpipe",
            "ingest",
            "--workers",
            "1",
            "--reuse-port",
            "--host",
            self.settings.ingest_host,
            "--port",
            str(self.settings.ingest_port),
        ]
        self._procs[slot] = subprocess.Popen(
            command, env=env, preexec_fn=_die_with_parent(os.getpid())
        )

    def _watch(self, env: dict[str, str]) -> None:
        backoff = Backoff(base_s=0.5, cap_s=30.0)
        while not self._stopping:
            time.sleep(0.2)
            for slot, proc in list(self._procs.items()):
                code = proc.poll()
                if code is None or self._stopping:
                    continue
                if code == EXIT_CONFIG:
                    log.error(
                        "ingest worker %d (pid %d) stopped on a configuration error (above);"
                        " restarting it cannot help, so every worker stops",
                        slot,
                        proc.pid,
                    )
                    self._stopping = True
                    self._status = 1
                    break
                delay = backoff.next_delay()
                log.error(
                    "ingest worker %d (pid %d) exited with %d; restarting in %.1fs",
                    slot,
                    proc.pid,
                    code,
                    delay,
                )
                if self._metrics_dir is not None:
                    _mark_dead(proc.pid, self._metrics_dir)
                time.sleep(delay)
                if not self._stopping:
                    self._start(slot, env)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("ingest: %s, letting in-flight requests finish", signal.Signals(signum).name)
        self._stopping = True

    def _stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.ingest_shutdown_timeout_s + 5
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("ingest worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """For Popen(preexec_fn=): the child gets SIGTERM when ``parent`` dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    def in_child() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def _wipe(directory: Path) -> None:
    """prometheus-client's multiprocess files must not survive from an earlier run."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """Drop a dead worker's live gauges from the aggregate."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
