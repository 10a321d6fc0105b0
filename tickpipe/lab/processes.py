"""The processes a run starts (bench, chaos, demo, tests): spawned with their stderr in a
log, stopped with SIGTERM and, after a grace period, SIGKILL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

TICKPIPE = (sys.executable, "-m", "tickpipe")
"""The command line of a `tickpipe` command run by this interpreter."""


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """SIGTERM (so it stops what it started), SIGKILL after ``grace_s``; its exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


class Processes:
    """Processes started for one run, all stopped when it ends (``with`` or :meth:`stop_all`).

    Each one's stderr goes to ``logs/<name>.log`` when ``logs`` is given, else to a
    temporary file (:meth:`log_tail` reads either), or to this process's own stderr
    with ``capture=False``.
    """

    def __init__(self, logs: Path | None = None) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []
        self._log_files: dict[int, IO[bytes]] = {}

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        *,
        capture: bool = True,
    ) -> subprocess.Popen[bytes]:
        log: IO[bytes] | None = None
        if capture:
            log = (  # closed by stop_all
                (self.logs / f"{name}.log").open("ab")
                if self.logs is not None
                else tempfile.TemporaryFile()  # noqa: SIM115
            )
        proc = subprocess.Popen(
            list(args),
            env=dict(env),
            stdout=subprocess.DEVNULL if capture else None,
            stderr=log,
        )
        self.started.append(proc)
        if log is not None:
            self._log_files[proc.pid] = log
        return proc

    def tickpipe(
        self, name: str, args: Sequence[str], env: Mapping[str, str], *, capture: bool = True
    ) -> subprocess.Popen[bytes]:
        """``tickpipe <args>`` run by this interpreter."""
        return self.spawn(name, [*TICKPIPE, *args], env, capture=capture)

    def log_tail(self, proc: subprocess.Popen[bytes], chars: int = 4000) -> str:
        """The end of what ``proc`` wrote to its stderr so far."""
        log = self._log_files[proc.pid]
        if self.logs is not None:
            written = Path(log.name).read_bytes()
        else:  # pread: the child shares the file's offset, which must not move
            written = os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0)
        return written.decode(errors="replace")[-chars:]

    def stop_all(self, grace_s: float = 30.0) -> None:
        """SIGTERM every process still running, then wait for each (SIGKILL after the grace)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.started:
            stop(proc, grace_s)
        for log in self._log_files.values():
            log.close()
        self._log_files.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()
