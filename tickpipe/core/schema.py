"""The schema files: where to find them and how to apply them.

``schema.sql`` is the base (md_ticks). Two optional parts apply on top of it:
``schema_rollups.sql`` (md_ranges and the triggers that feed `tickpipe rollup`)
and ``schema_brin.sql`` (a BRIN index on md_ticks.ts). Each is idempotent and
usable on its own with ``psql -f``.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("tickpipe")

BASE = "schema.sql"
ROLLUPS = "schema_rollups.sql"
BRIN = "schema_brin.sql"


def schema_sql(name: str = BASE) -> str:
    """The text of a schema file: from the installed package, else from the source tree."""
    packaged = resources.files("tickpipe").joinpath(name)
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / name).read_text()


def schema_files(*, rollups: bool = False, brin: bool = False) -> list[str]:
    """The files to apply, in order: the base first, then the chosen options."""
    return [BASE, *([ROLLUPS] if rollups else []), *([BRIN] if brin else [])]


async def apply_schema(database_url: str, *, rollups: bool = False, brin: bool = False) -> None:
    """Apply schema.sql and the chosen optional parts (all idempotent) in one transaction."""
    conn = await asyncpg.connect(database_url)
    conn.add_log_listener(_log_warning)
    try:
        async with conn.transaction():
            for name in schema_files(rollups=rollups, brin=brin):
                await conn.execute(schema_sql(name))
    finally:
        await conn.close()


def _log_warning(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
    """Pass on what the schema files warn about (rows breaking a rule; NOTICEs are noise)."""
    if message.severity == "WARNING":
        log.warning("schema: %s", message.message)


async def ensure_database(database_url: str) -> None:
    """Create the database named in ``database_url`` if it does not exist yet."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if not name or name == "postgres":
        return
    maintenance_url = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(maintenance_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            quoted = '"' + name.replace('"', '""') + '"'
            await conn.execute(f"CREATE DATABASE {quoted}")
    finally:
        await conn.close()
