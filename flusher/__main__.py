"""`python -m flusher`: the same as `tickpipe flusher run`."""

from tickpipe.cli import flusher_run

flusher_run(prog_name="python -m flusher")
