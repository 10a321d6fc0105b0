"""The failures the workers (flusher, rollup) tell apart; their stores translate driver
errors into these, so a worker decides what to do without knowing redis-py or asyncpg."""

from __future__ import annotations


class TransientError(Exception):
    """A server is unavailable or busy: retry with backoff; nothing was committed or acked."""


class FatalError(Exception):
    """The worker cannot work with this configuration (no table, no permission...).

    The message says what to do; nothing was committed or acknowledged.
    """


class Stopping(Exception):
    """A stop was requested while an operation waited to be retried: it is given up."""
