-- tickpipe, optional: OHLCV rollups of md_ticks into md_ranges. Idempotent;
-- apply after schema.sql (`tickpipe schema apply --rollups`, or
-- psql -f schema_rollups.sql). Needs PostgreSQL 14 or later (date_bin,
-- CREATE OR REPLACE TRIGGER) and the btree_gist extension (in contrib).
-- The design, and why it is correct under concurrency: docs/rollups.md.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- One row per (symbol, window) of each width `tickpipe rollup` computes.
-- agg: {"open","high","low","close","volume"} as decimal strings (exact in
-- every JSON reader, not only in Postgres) and "count" as a number.
CREATE TABLE IF NOT EXISTS md_ranges (
    symbol text NOT NULL,
    "window" tstzrange NOT NULL,
    agg jsonb NOT NULL,
    -- A window is recomputed and upserted whole: the key makes that idempotent.
    PRIMARY KEY (symbol, "window")
);

-- "Which aggregates cover time T": symbol = $1 AND "window" @> T.
CREATE INDEX IF NOT EXISTS md_ranges_symbol_window_gist ON md_ranges USING gist (symbol, "window");

-- The queue of seconds whose ticks changed since they were last rolled up.
-- Rows are only ever inserted (by the triggers below) and deleted (by the
-- rollup worker that processed them): no unique key, so a mark written while a
-- worker holds an equal one is a new row the worker leaves for the next pass.
CREATE TABLE IF NOT EXISTS md_ranges_dirty (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    symbol text NOT NULL,
    second_ts timestamptz NOT NULL
);

-- Statement-level triggers: one INSERT of marks per upsert statement, whatever
-- its size, in the same transaction as the ticks, so a committed tick always
-- leaves a committed mark. INSERT ... ON CONFLICT DO UPDATE fires both; each
-- transition table holds only the rows it inserted or updated (a conflict the
-- WHERE clause skips changes nothing and marks nothing). Deletes mark
-- nothing: dropping old ticks (retention) keeps their rollups.
CREATE OR REPLACE FUNCTION md_ranges_mark_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO md_ranges_dirty (symbol, second_ts)
    SELECT DISTINCT symbol, date_bin('1 second', ts, timestamptz 'epoch') FROM new_ticks;
    RETURN NULL;
END
$$;

-- An update marks the old key's second too, in case it moved a tick (the
-- flusher never does; a hand-written UPDATE might).
CREATE OR REPLACE FUNCTION md_ranges_mark_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO md_ranges_dirty (symbol, second_ts)
    SELECT DISTINCT symbol, date_bin('1 second', ts, timestamptz 'epoch')
    FROM (SELECT symbol, ts FROM new_ticks UNION ALL SELECT symbol, ts FROM old_ticks) AS changed;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER md_ticks_rollup_inserted
    AFTER INSERT ON md_ticks REFERENCING NEW TABLE AS new_ticks
    FOR EACH STATEMENT EXECUTE FUNCTION md_ranges_mark_inserted();

CREATE OR REPLACE TRIGGER md_ticks_rollup_updated
    AFTER UPDATE ON md_ticks REFERENCING OLD TABLE AS old_ticks NEW TABLE AS new_ticks
    FOR EACH STATEMENT EXECUTE FUNCTION md_ranges_mark_updated();
