"""Bad input campaign: hypothesis throws malformed, mistyped, unauthenticated and huge
requests at ingest, interleaved with valid ticks. No bad request gets a 5xx or
stores anything; every valid tick is stored."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ingest.app import create_app
from tickpipe.core.settings import Settings

pytestmark = pytest.mark.services

TOKEN = "test-token-0123456789"
GOOD = {"symbol": "OK", "ts": 1714564800000, "price": "1.5", "volume": 2, "source": "fuzz"}
REFUSALS = {400, 401, 413, 415, 422}
Client = TestClient[Any, Any]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def bad_ticks(draw: st.DrawFn) -> Any:
    """A valid tick with one thing wrong: a field retyped, removed, or one too many."""
    tick: dict[str, Any] = dict(GOOD)
    field = draw(st.sampled_from(sorted(GOOD)))
    how = draw(st.sampled_from(["retype", "drop", "extra", "bad_value"]))
    if how == "retype":
        # Not a number: a JSON number is a valid price, volume or ts (1.0 is a price).
        tick[field] = draw(json_values.filter(lambda v: not isinstance(v, str | int | float)))
    elif how == "drop":
        del tick[field]
    elif how == "extra":
        tick[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in GOOD))] = 1
    else:
        tick[field] = {
            "symbol": draw(st.sampled_from(["", "A" * 33, "a b", "é", "x\n"])),
            "ts": draw(st.sampled_from(["2024-01-01", "2024-01-01T00:00:00", -5, "1e3"])),
            "price": draw(st.sampled_from(["NaN", "-1", "0", "1e9999", "Infinity", "1,5"])),
            "volume": draw(st.sampled_from(["-0.1", "inf", "", "1e-40"])),
            "source": draw(st.sampled_from(["", "s" * 65, "a\u0000b"])),
        }[field]
    return tick


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    kind = draw(
        st.sampled_from(["tick", "batch", "bytes", "json", "no_auth", "bad_auth", "type", "huge"])
    )
    json_type = {"Content-Type": "application/json"}
    if kind == "tick":
        return "tick", {**auth, **json_type}, json.dumps(draw(bad_ticks())).encode()
    if kind == "batch":
        ticks = [GOOD] * draw(st.integers(0, 3)) + [draw(bad_ticks())]
        return "ticks", {**auth, **json_type}, json.dumps(ticks).encode()
    if kind == "bytes":
        return draw(st.sampled_from(["tick", "ticks"])), {**auth, **json_type}, draw(st.binary())
    if kind == "json":
        value = draw(json_values)
        return (
            draw(st.sampled_from(["tick", "ticks"])),
            {**auth, **json_type},
            json.dumps(value).encode(),
        )
    if kind == "no_auth":
        return "tick", json_type, json.dumps(GOOD).encode()
    if kind == "bad_auth":
        printable = st.characters(min_codepoint=33, max_codepoint=126)  # what HTTP can carry
        token = draw(st.text(printable, min_size=1, max_size=30).filter(lambda t: t != TOKEN))
        header = {"Authorization": f"Bearer {token}"}
        return "tick", {**header, **json_type}, json.dumps(GOOD).encode()
    if kind == "type":
        content_type = draw(
            st.sampled_from(["text/plain", "application/xml", "multipart/form-data"])
        )
        return "tick", {**auth, "Content-Type": content_type}, json.dumps(GOOD).encode()
    return "ticks", {**auth, **json_type}, json.dumps([GOOD] * 5001).encode()


@pytest.fixture
async def client(settings: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=bad_requests(), good_ts=st.integers(0, 10**12))
async def test_bad_requests_interleaved_with_good_ones(
    client: Client, redis: Redis, request: tuple[str, dict[str, str], bytes], good_ts: int
) -> None:
    path, headers, body = request
    before = await redis.xlen("ticks.received")
    response = await client.post(f"/ingest/{path}", data=body, headers=headers)
    assert response.status in REFUSALS, (response.status, await response.text())
    payload = await response.json()
    assert set(payload) <= {"error", "detail", "index", "field"}
    assert await redis.xlen("ticks.received") == before  # nothing stored

    valid = {**GOOD, "ts": good_ts}
    response = await client.post(
        "/ingest/tick", json=valid, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status == 200
    [entry_id] = (await response.json())["ids"]
    [(_, fields)] = await redis.xrange("ticks.received", entry_id, entry_id)
    assert fields[b"symbol"] == b"OK"
    assert fields[b"ts"] == str(good_ts * 1000).encode()
    assert await redis.xlen("ticks.received") == before + 1
