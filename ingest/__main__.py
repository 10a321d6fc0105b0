"""`python -m ingest`: the same as `tickpipe ingest`."""

from tickpipe.cli import ingest

ingest(prog_name="python -m ingest")
