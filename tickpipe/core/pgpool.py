"""One way to open and close an asyncpg pool, shared by the flusher, rollups and queries."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import asyncpg

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0


class InitConnection(Protocol):
    """Run on every new connection of the pool (the flusher creates its staging table)."""

    async def __call__(self, con: asyncpg.Connection, /) -> None: ...


async def keep_session(con: asyncpg.Connection, /) -> None:
    """A ``reset`` that keeps the session as it is when a connection returns to the pool.

    asyncpg's default resets each returned connection with one more query
    (``RESET ALL``, ``UNLISTEN *``, advisory locks released): a round trip per
    use. A pool whose users set nothing on the session may skip it; an open
    transaction is still rolled back.
    """


async def open_pool(
    database_url: str,
    *,
    max_size: int,
    command_timeout_s: float = COMMAND_TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    init: InitConnection | None = None,
    reset: InitConnection | None = None,
    server_settings: Mapping[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool that connects nothing until first use (min_size=0).

    So a process starts, and retries with backoff, while Postgres is down. A
    statement stuck (on a lock, say) fails after ``command_timeout_s`` and is
    retried, instead of holding its work, and a shutdown, forever.
    """
    pool: asyncpg.Pool = await asyncpg.create_pool(
        database_url,
        min_size=0,
        max_size=max_size,
        init=init,
        reset=reset,
        timeout=connect_timeout_s,
        command_timeout=command_timeout_s,
        server_settings=dict(server_settings) if server_settings else None,
    )
    return pool


async def close_pool(pool: asyncpg.Pool, timeout_s: float = 2.0) -> None:
    """Close ``pool``; connections still busy after ``timeout_s`` are cut."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        pool.terminate()
