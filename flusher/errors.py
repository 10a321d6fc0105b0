"""The flusher's own failure kind; the shared ones (TransientError, FatalError) are in
tickpipe/core/errors.py."""

from __future__ import annotations


class RowsRejected(Exception):
    """Postgres refused the data itself (a data exception or constraint violation).

    Retrying the same rows cannot help; the worker bisects the batch to find them.
    """
