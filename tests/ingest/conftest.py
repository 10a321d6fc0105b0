"""The in-process ingest app the endpoint tests talk to, over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from ingest.app import create_app
from tickpipe.core.settings import Settings

READ_TOKENS = {"dashboard": "read-token-0123456789"}
"""A read-only token beside the session's ingest token (tests/conftest.py)."""

Client = TestClient[Any, Any]
MakeClient = Callable[..., AbstractAsyncContextManager[Client]]


async def read_event_fields(response: aiohttp.ClientResponse, count: int) -> list[dict[str, str]]:
    """The next ``count`` events of an open event stream, as their fields (comments skipped)."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    while len(events) < count:
        line = (await response.content.readline()).decode().rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif fields:
            events.append(fields)
            fields = {}
    return events


@pytest.fixture
def make_client(settings: Settings, redis: Redis) -> MakeClient:
    """An ingest app on the test Redis (emptied) and Postgres; keyword arguments change settings."""

    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Client]:
        app = create_app(settings.replace(**{"read_tokens": READ_TOKENS, **overrides}))
        async with TestClient(TestServer(app)) as client:
            yield client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> AsyncIterator[Client]:
    async with make_client() as test_client:
        yield test_client
