"""The CLI loads a service or tool only for the command that runs it (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys

ABOVE_CORE = ("ingest", "flusher", "tickpipe.rollup", "tickpipe.ops", "tickpipe.lab")


def test_the_cli_imports_nothing_above_core_until_a_command_runs() -> None:
    code = (
        "import sys, tickpipe.cli\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({ABOVE_CORE!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []


def test_help_of_every_command_works_with_the_lazy_imports() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tickpipe", "--help"], capture_output=True, text=True, check=True
    )
    assert "flusher" in result.stdout
    assert "audit" in result.stdout
