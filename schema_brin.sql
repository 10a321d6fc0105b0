-- tickpipe, optional: a BRIN index on md_ticks(ts). Idempotent; apply after
-- schema.sql (`tickpipe schema apply --brin`, or psql -f schema_brin.sql).
--
-- For scans of a time range across all symbols ("every tick between 10:00 and
-- 10:05") on a table that grows in time order: BRIN keeps the min and max ts
-- of each block range (128 pages), so it is tiny and nearly free to maintain,
-- and such a scan reads only the block ranges that can match. It does nothing
-- for one symbol's ticks: the (symbol, ts) btrees serve those. docs/brin.md
-- has a measured example.
CREATE INDEX IF NOT EXISTS md_ticks_ts_brin ON md_ticks USING brin (ts);
