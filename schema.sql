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

-- The tick rules (tickpipe/ticks.py), kept by Postgres for every writer: the
-- flusher copies values as text straight from the stream entries. Added
-- NOT VALID (no scan, no long lock), then validated; rows already there that
-- break a rule (written by other means) leave it unvalidated, with a warning:
-- new rows are checked all the same.
DO $$
DECLARE
    rule text[];
BEGIN
    FOREACH rule SLICE 1 IN ARRAY ARRAY[
        ['md_ticks_symbol_check', $r$symbol ~ '^[A-Za-z0-9._:/-]{1,32}$'$r$],
        ['md_ticks_price_check',
         $r$price > 0 AND price < 1e78 AND scale(price) <= 18$r$],
        ['md_ticks_volume_check',
         $r$volume >= 0 AND volume < 1e78 AND scale(volume) <= 18$r$],
        ['md_ticks_source_check',
         $r$char_length(source) BETWEEN 1 AND 64 AND source !~ '[\u0001-\u001f\u007f-\u009f]'$r$]
    ] LOOP
        IF NOT EXISTS (SELECT FROM pg_constraint
                       WHERE conrelid = 'md_ticks'::regclass AND conname = rule[1]) THEN
            EXECUTE format('ALTER TABLE md_ticks ADD CONSTRAINT %I CHECK (%s) NOT VALID',
                           rule[1], rule[2]);
        END IF;
        IF EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'md_ticks'::regclass
                   AND conname = rule[1] AND NOT convalidated) THEN
            BEGIN
                EXECUTE format('ALTER TABLE md_ticks VALIDATE CONSTRAINT %I', rule[1]);
            EXCEPTION WHEN check_violation THEN
                RAISE WARNING 'md_ticks holds rows that break %: new rows are checked, those'
                    ' are not; list them with SELECT * FROM md_ticks WHERE NOT (%)',
                    rule[1], rule[2];
            END;
        END IF;
    END LOOP;
END
$$;
