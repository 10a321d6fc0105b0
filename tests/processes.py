"""Processes a test starts and must not leave behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tickpipe.lab.processes import TICKPIPE


def run_to_end(
    command: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end. A test stopped meanwhile (a timeout, SIGTERM) stops it
    with SIGTERM, so that it stops its own servers (a SIGKILL would orphan them)."""
    with subprocess.Popen(
        list(command),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            finally:
                proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


async def tickpipe(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``tickpipe <args>`` run to its end with ``env`` (its whole environment), its output
    captured; for the short commands (audit, dlq, shards, flusher --check or --burst)."""
    return await asyncio.to_thread(
        subprocess.run,
        [*TICKPIPE, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def leftovers(state: Path) -> list[str]:
    """Processes still working in ``state`` (Redis in its dir, Postgres in its data)."""
    found = []
    root = str(state.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if (cwd.startswith(root) or root in cmdline) and alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline}")
    return found


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
