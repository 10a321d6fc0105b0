"""schema.sql: where to find it and how to apply it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def schema_sql() -> str:
    """The text of schema.sql: from the installed package, else from the source tree."""
    packaged = resources.files("tickpipe").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parent.parent / "schema.sql").read_text()


async def apply_schema(database_url: str) -> None:
    """Apply schema.sql (idempotent) in one transaction."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(schema_sql())
    finally:
        await conn.close()


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
