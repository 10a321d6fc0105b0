import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from tickpipe.core.schema import apply_schema, schema_sql
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import LocalStack

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

    assert schema_sql() == (Path(__file__).parents[3] / "schema.sql").read_text()


@pytest.mark.parametrize("name", ["schema_rollups.sql", "schema_brin.sql"])
def test_optional_schema_texts_match_their_files(name: str) -> None:
    from pathlib import Path

    assert schema_sql(name) == (Path(__file__).parents[3] / name).read_text()


async def test_the_base_schema_has_no_optional_parts(pg: asyncpg.Connection) -> None:
    assert await pg.fetchval("SELECT to_regclass('md_ticks_ts_brin')") is None
    assert await pg.fetchval("SELECT to_regclass('md_ranges')") is None
    assert await pg.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md_ticks%'") == 0


async def test_apply_with_options_is_idempotent_and_complete(stack: LocalStack) -> None:
    from tickpipe.core.schema import ensure_database

    url = stack.database_url.rsplit("/", 1)[0] + "/tickpipe_schema_options"
    await ensure_database(url)
    env = {**os.environ, "DATABASE_URL": url}
    for _ in range(2):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tickpipe", "schema", "apply", "--rollups", "--brin"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "schema applied: schema.sql, schema_rollups.sql, schema_brin.sql" in done.stderr
    conn = await asyncpg.connect(url)
    try:
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes"
                " WHERE tablename IN ('md_ticks', 'md_ranges')"
            )
        }
        assert indexes["md_ticks_ts_brin"].endswith("USING brin (ts)")
        assert indexes["md_ranges_pkey"].endswith('USING btree (symbol, "window")')
        assert indexes["md_ranges_symbol_window_gist"].endswith('USING gist (symbol, "window")')
        assert len([name for name in indexes if name.startswith("md_ticks")]) == 3
        triggers = await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'md_ticks'::regclass ORDER BY 1"
        )
        assert [t["tgname"] for t in triggers] == [
            "md_ticks_rollup_inserted",
            "md_ticks_rollup_updated",
        ]
        assert await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'btree_gist'")
    finally:
        await conn.close()


async def test_the_tick_rules_apply_to_an_existing_database_without_failing(
    stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    """A database from before the CHECK constraints, holding a row that breaks one: the
    apply succeeds, warns, and checks new rows; once the row is fixed, the rule is valid."""
    from tickpipe.core.schema import ensure_database

    url = stack.database_url.rsplit("/", 1)[0] + "/tickpipe_schema_existing"
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP TABLE IF EXISTS md_ticks")
        await conn.execute(schema_sql().split("\n-- The tick rules")[0])
        await conn.execute(
            "INSERT INTO md_ticks VALUES ('BAD SYMBOL', now(), 1, 1, 's', NULL),"
            " ('OK', now(), 1, 1, 's', NULL)"
        )
        await apply_schema(url)
        assert "md_ticks holds rows that break md_ticks_symbol_check" in caplog.text
        valid = dict(
            await conn.fetch(
                "SELECT conname, convalidated FROM pg_constraint"
                " WHERE conrelid = 'md_ticks'::regclass AND contype = 'c'"
            )
        )
        assert valid == {
            "md_ticks_symbol_check": False,
            "md_ticks_price_check": True,
            "md_ticks_volume_check": True,
            "md_ticks_source_check": True,
        }
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO md_ticks VALUES ('A B', now(), 1, 1, 's', NULL)")
        await conn.execute("DELETE FROM md_ticks WHERE symbol = 'BAD SYMBOL'")
        await apply_schema(url)
        assert await conn.fetchval(
            "SELECT bool_and(convalidated) FROM pg_constraint"
            " WHERE conrelid = 'md_ticks'::regclass AND contype = 'c'"
        )
    finally:
        await conn.close()
