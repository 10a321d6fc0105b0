"""The contract and the shared runtime: tick model, key names, entry formats, settings,
Redis and Postgres helpers. Imports nothing else of tickpipe (docs/architecture.md)."""
