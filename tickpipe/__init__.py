"""tickpipe: market ticks from a webhook into Postgres with zero loss."""

__version__ = "0.1.0"
