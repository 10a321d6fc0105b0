"""Which Postgres errors mean "unavailable right now, retry later"."""

from __future__ import annotations

import asyncpg

# SQLSTATE classes: 08 connection, 40 transaction rollback (deadlock,
# serialization), 53 insufficient resources, 57 operator intervention
# (shutdown, cannot connect now), 58 system error.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
# ... and a read-only server (a replica just promoted or demoted), a lock timeout.
_TRANSIENT_STATES = ("25006", "55P03")


def is_transient(exc: BaseException) -> bool:
    """True for an outage, a timeout or a conflict that the same statement may survive later."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        return sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate in _TRANSIENT_STATES
    if isinstance(exc, asyncpg.DataError | asyncpg.ClientConfigurationError):
        return False  # asyncpg's InterfaceError subclasses for a bad value or a bad DSN
    return isinstance(exc, OSError | asyncpg.InterfaceError | TimeoutError)
