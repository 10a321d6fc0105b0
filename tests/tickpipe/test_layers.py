"""The CLI loads a service or tool only for the command that runs it (docs/architecture.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def test_every_file_the_architecture_page_names_exists() -> None:
    named = set(re.findall(r"`((?:ingest|flusher|tickpipe|tests)/[\w/.]+\.py)", ARCHITECTURE))
    assert named
    assert sorted(path for path in named if not (ROOT / path).is_file()) == []


def test_the_architecture_page_names_every_module_of_core() -> None:
    modules = {p.name for p in (ROOT / "tickpipe" / "core").glob("*.py")} - {"__init__.py"}
    assert sorted(m for m in modules if f"`{m}`" not in ARCHITECTURE) == []
