import asyncpg
import pytest

from tickpipe.schema import apply_schema, schema_sql
from tickpipe.settings import Settings

pytestmark = pytest.mark.services


async def test_schema_is_idempotent_and_complete(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    await apply_schema(settings.database_url)
    await apply_schema(settings.database_url)
    columns = await pg.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_name = 'md_ticks' ORDER BY ordinal_position"
    )
    assert [(c["column_name"], c["data_type"], c["is_nullable"]) for c in columns] == [
        ("symbol", "text", "NO"),
        ("ts", "timestamp with time zone", "NO"),
        ("price", "numeric", "NO"),
        ("volume", "numeric", "NO"),
        ("source", "text", "NO"),
        ("stream_id", "text", "YES"),
    ]
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await pg.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'md_ticks'"
        )
    }
    assert indexes["md_ticks_pkey"].endswith("(symbol, ts)")
    assert indexes["md_ticks_symbol_ts_desc"].endswith("(symbol, ts DESC)")


def test_schema_text_matches_the_file() -> None:
    from pathlib import Path

    assert schema_sql() == (Path(__file__).parents[2] / "schema.sql").read_text()
