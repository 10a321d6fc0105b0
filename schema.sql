-- tickpipe schema. Idempotent: safe to apply any number of times
-- (`tickpipe schema apply`, or psql -f schema.sql).

-- One row per (symbol, ts). A second tick with the same key replaces the
-- first: the flusher upserts, last stream entry wins.
CREATE TABLE IF NOT EXISTS md_ticks (
    symbol text NOT NULL,
    ts timestamptz NOT NULL,
    price numeric NOT NULL,
    volume numeric NOT NULL,
    source text NOT NULL,
    PRIMARY KEY (symbol, ts)
);

-- The id (<ms>-<seq>) of the stream entry the row was last written from.
-- Competing flushers may commit two versions of one key out of order (one
-- reclaimed after a crash, say); a row is only replaced by a later entry, so
-- the last write wins by stream order. It also traces a row to its entry.
-- NULL for rows written by other means.
ALTER TABLE md_ticks ADD COLUMN IF NOT EXISTS stream_id text;

-- "Newest first" history for one symbol.
CREATE INDEX IF NOT EXISTS md_ticks_symbol_ts_desc ON md_ticks (symbol, ts DESC);
