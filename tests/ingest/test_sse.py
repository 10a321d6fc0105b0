"""GET /ticks/stream read by a real HTTP client: ids, resume, heartbeats, slow and gone clients."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest import metrics
from ingest.appkeys import LINK
from tests.ingest.conftest import read_event_fields

pytestmark = pytest.mark.services

WRITER = {"Authorization": "Bearer test-token-0123456789"}
READER = {"Authorization": "Bearer read-token-0123456789"}
Client = TestClient[Any, Any]
MakeClient = Callable[..., AbstractAsyncContextManager[Client]]
Event = tuple[str, str, dict[str, Any]]  # id, event type, data


async def post(client: Client, symbol: str, count: int, first: int = 0) -> list[str]:
    """Ingest ``count`` ticks of ``symbol`` (ts = first, first+1... ms); their stream ids."""
    ticks = [
        {
            "symbol": symbol,
            "ts": 1714564800000 + i,
            "price": f"1.{i:04d}",
            "volume": i,
            "source": "t",
        }
        for i in range(first, first + count)
    ]
    response = await client.post("/ingest/ticks", json=ticks, headers=WRITER)
    assert response.status == 200
    ids: list[str] = (await response.json())["ids"]
    return ids


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[Event]:
    """The next ``count`` events of an open event stream (comments skipped)."""
    async with asyncio.timeout(20):
        events = await read_event_fields(response, count)
    return [
        (fields.get("id", ""), fields["event"], json.loads(fields["data"])) for fields in events
    ]


async def open_stream(client: Client, query: str = "", **headers: str) -> aiohttp.ClientResponse:
    response = await client.get(f"/ticks/stream{query}", headers={**READER, **headers})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (state of the server under test; no event to wait on)."""
    async with asyncio.timeout(20):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_events_are_ticks_with_their_stream_ids_for_the_asked_symbols(
    client: Client,
) -> None:
    stream = await open_stream(client, "?symbols=AAPL,MSFT")
    aapl = await post(client, "AAPL", 3)
    await post(client, "GOOG", 3)
    msft = await post(client, "MSFT", 2)
    events = await read_events(stream, 5)
    assert [e[0] for e in events] == aapl + msft
    assert {e[1] for e in events} == {"tick"}
    assert events[0][2] == {
        "symbol": "AAPL",
        "ts": "2024-05-01T12:00:00.000000Z",
        "price": "1.0000",
        "volume": "0",
        "source": "t",
    }
    stream.close()


async def test_resume_from_last_event_id_has_no_gap_and_no_duplicate(client: Client) -> None:
    before = await post(client, "AAPL", 1200)  # more than one catch-up page
    stream = await open_stream(client, "?symbols=AAPL", **{"Last-Event-ID": before[99]})
    seen = [e[0] for e in await read_events(stream, 1100)]
    assert seen == before[100:]
    live = await post(client, "AAPL", 50, first=1200)
    seen += [e[0] for e in await read_events(stream, 20)]
    stream.close()  # gone after 20 of the 50
    missed = await post(client, "AAPL", 30, first=1250)
    resumed = await open_stream(client, "?symbols=AAPL", **{"Last-Event-ID": seen[-1]})
    rest = [e[0] for e in await read_events(resumed, 60)]
    assert rest == live[20:] + missed
    resumed.close()


async def test_ticks_posted_while_clients_connect_are_never_missed(client: Client) -> None:
    """Subscribing races the hub's reads; the extra catch-up covers the window."""
    feeding = asyncio.create_task(post_many(client, 40))
    streams = []
    for _ in range(5):
        streams.append(await open_stream(client, "?symbols=RACE"))
        await asyncio.sleep(0.01)
    ids = await feeding
    for stream in streams:
        first = await read_events(stream, 1)
        start = ids.index(first[0][0])
        rest = await read_events(stream, len(ids) - start - 1)
        assert [first[0][0]] + [e[0] for e in rest] == ids[start:]
        stream.close()


async def post_many(client: Client, batches: int) -> list[str]:
    ids: list[str] = []
    for i in range(batches):
        ids += await post(client, "RACE", 10, first=i * 10)
        await asyncio.sleep(0.005)
    return ids


async def test_a_trimmed_resume_point_is_announced_as_a_gap(client: Client, redis: Redis) -> None:
    ids = await post(client, "AAPL", 10)
    await redis.xtrim("ticks.received", minid=ids[6], approximate=False)
    stream = await open_stream(client, "", **{"Last-Event-ID": ids[2]})
    [gap, *rest] = await read_events(stream, 5)
    assert gap[1] == "gap"
    assert gap[2]["after"] == ids[2]
    assert gap[2]["resumes_at"] == ids[6]
    assert [e[0] for e in rest] == ids[6:]
    stream.close()


async def test_heartbeats_keep_an_idle_stream_alive(make_client: MakeClient) -> None:
    async with make_client(sse_heartbeat_s=0.1) as client:
        stream = await open_stream(client)
        async with asyncio.timeout(10):
            assert (await stream.content.readline()).startswith(b": ping")
        stream.close()


async def test_a_client_that_leaves_is_unsubscribed(make_client: MakeClient) -> None:
    async with make_client(sse_heartbeat_s=0.1) as client:
        hub = client.server.app[LINK].get().hubs
        stream = await open_stream(client)
        await post(client, "AAPL", 1)
        await read_events(stream, 1)
        assert hub.clients == 1
        stream.close()
        await wait_for(lambda: hub.clients == 0)


async def test_a_slow_client_is_dropped_and_never_slows_ingest(
    make_client: MakeClient, redis: Redis
) -> None:
    async with make_client(sse_client_buffer=5, sse_heartbeat_s=0.2) as client:
        hub = client.server.app[LINK].get().hubs
        dropped = metrics.SSE_DROPPED._value.get()
        # A client that asks for the stream and then never reads a byte.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (client.host, client.port))
        request = (
            f"GET /ticks/stream HTTP/1.1\r\nHost: x\r\n{'Authorization'}: {READER['Authorization']}"
            "\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        await wait_for(lambda: hub.clients == 1)
        for batch in range(40):
            await post(client, "FLOOD", 500, first=batch * 500)
        await wait_for(lambda: hub.clients == 0)
        assert metrics.SSE_DROPPED._value.get() > dropped
        assert await redis.xlen("ticks.received") == 20_000
        sock.close()


async def test_stopping_the_server_ends_event_streams(client: Client) -> None:
    stream = await open_stream(client)
    client.server.app[LINK].get().hubs.close()
    async with asyncio.timeout(10):
        while await stream.content.readline():
            pass
    assert stream.content.at_eof()


@pytest.mark.parametrize(
    ("query", "headers", "status", "field"),
    [
        ("?symbols=AAPL,bad%20one", {}, 422, "symbols"),
        ("?symbols=", {}, 422, "symbols"),
        ("?symbol=AAPL", {}, 422, "symbol"),
        ("", {"Last-Event-ID": "yesterday"}, 422, "Last-Event-ID"),
        # Found by schemathesis: accepted, then refused by Redis, or a 500.
        ("", {"Last-Event-ID": "99999999999999999999-0"}, 422, "Last-Event-ID"),  # > 2**64
        ("", {"Last-Event-ID": "\u00b2-0"}, 422, "Last-Event-ID"),
        ("?shard=%C2%B2", {}, 422, "shard"),
        ("?shard=" + "1" * 5000, {}, 422, "shard"),
        # As documented: the symbols between the commas, nothing around them.
        ("?symbols=AAPL,", {}, 422, "symbols"),
        ("?symbols=AAPL,%20MSFT", {}, 422, "symbols"),
        ("?symbols=" + ",".join(["AAPL"] * 101), {}, 422, "symbols"),
        ("", {"Authorization": "Bearer wrong"}, 401, None),
    ],
)
async def test_bad_requests_are_refused_before_streaming(
    client: Client, query: str, headers: dict[str, str], status: int, field: str | None
) -> None:
    response = await client.get(f"/ticks/stream{query}", headers={**READER, **headers})
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert (await response.json()).get("field") == field
