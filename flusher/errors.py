"""The three kinds of failure the flusher tells apart, in one place.

``stream.py`` and ``db.py`` translate driver exceptions into these, so the
worker decides what to do without knowing redis-py or asyncpg.
"""

from __future__ import annotations


class TransientError(Exception):
    """A server is unavailable or busy: retry with backoff, acknowledge nothing."""


class RowsRejected(Exception):
    """Postgres refused the data itself (a data exception or constraint violation).

    Retrying the same rows cannot help; the worker bisects the batch to find them.
    """


class FatalError(Exception):
    """The flusher cannot work with this configuration (no md_ticks, no permission...).

    The message says what to do; nothing is acknowledged, the entries wait.
    """
