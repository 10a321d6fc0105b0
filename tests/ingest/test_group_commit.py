"""Group commit: the ticks of every waiting request go to Redis in one round trip."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from ingest.appkeys import LINK
from tests.conftest import TEST_TOKEN
from tests.ingest.conftest import Client, MakeClient

pytestmark = pytest.mark.services

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def tick(symbol: str, ms: int, price: str = "1.5") -> dict[str, Any]:
    return {"symbol": symbol, "ts": 1714564800000 + ms, "price": price, "volume": 1, "source": "g"}


async def post_many(client: Client, bodies: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    async def one(body: list[dict[str, Any]]) -> dict[str, Any]:
        response = await client.post("/ingest/ticks", json=body, headers=AUTH)
        answer: dict[str, Any] = await response.json()
        answer["status"] = response.status
        return answer

    return await asyncio.gather(*(one(body) for body in bodies))


async def test_concurrent_requests_share_round_trips_and_get_their_own_ids(
    make_client: MakeClient, redis: Redis
) -> None:
    bodies = [[tick(f"S{r}", i) for i in range(3)] for r in range(60)]
    async with make_client() as client:
        answers = await post_many(client, bodies)
        groups = client.app[LINK].get().writer.groups
    assert all(a["status"] == 200 for a in answers)
    assert groups < len(bodies)  # several requests per round trip
    entries = {
        i.decode(): {k.decode(): v.decode() for k, v in f.items()}
        for i, f in await redis.xrange("ticks.received")
    }
    assert len(entries) == 180
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["accepted"] == 3
        # Each request's ids are its own ticks, in its order.
        assert [entries[i]["symbol"] for i in answer["ids"]] == [t["symbol"] for t in body]
        assert [int(entries[i]["ts"]) // 1000 for i in answer["ids"]] == [t["ts"] for t in body]


async def test_a_group_is_bounded_in_ticks(make_client: MakeClient, redis: Redis) -> None:
    bodies = [[tick("B", r * 10 + i) for i in range(4)] for r in range(20)]
    async with make_client(ingest_group_max_ticks=8) as client:
        answers = await post_many(client, bodies)
        groups = client.app[LINK].get().writer.groups
    assert all(a["status"] == 200 for a in answers)
    assert groups >= 10  # at most two requests of 4 ticks per group
    assert await redis.xlen("ticks.received") == 80


async def test_a_request_over_the_bound_is_a_group_of_its_own(
    make_client: MakeClient, redis: Redis
) -> None:
    async with make_client(ingest_group_max_ticks=2) as client:
        [answer] = await post_many(client, [[tick("O", i) for i in range(5)]])
    assert answer["status"] == 200
    assert answer["accepted"] == 5


async def test_a_failed_group_answers_each_request_503_and_stores_nothing(
    make_client: MakeClient, redis: Redis
) -> None:
    async with make_client() as client:
        await redis.config_set("maxmemory", "1")
        try:
            answers = await post_many(client, [[tick(f"F{r}", 1)] for r in range(20)])
        finally:
            await redis.config_set("maxmemory", "0")
        assert {a["status"] for a in answers} == {503}
        assert {a["error"] for a in answers} == {"redis_unavailable"}
        assert await redis.xlen("ticks.received") == 0
        # The writer goes on with the next group.
        [again] = await post_many(client, [[tick("F", 2)]])
        assert again["status"] == 200


async def test_linger_gathers_requests_that_arrive_a_little_apart(
    make_client: MakeClient, redis: Redis
) -> None:
    async def staggered(client: Client) -> list[dict[str, Any]]:
        async def one(r: int) -> dict[str, Any]:
            await asyncio.sleep(r * 0.002)
            [answer] = await post_many(client, [[tick("L", r)]])
            return answer

        return await asyncio.gather(*(one(r) for r in range(10)))

    async with make_client(ingest_linger_ms=50) as client:
        answers = await staggered(client)
        groups = client.app[LINK].get().writer.groups
    assert all(a["status"] == 200 for a in answers)
    assert groups <= 3


async def test_latest_price_is_the_newest_tick_of_the_group_and_before(
    make_client: MakeClient, redis: Redis
) -> None:
    async with make_client() as client:
        first = await post_many(client, [[tick("Z", 50, "9")]])
        assert first[0]["status"] == 200
        # One request, several ticks of Z out of order: the greatest ts wins, and of
        # two with that ts the later one in stream order; an older one changes nothing.
        body = [tick("Z", 40, "1"), tick("Z", 60, "2"), tick("Z", 55, "3"), tick("Z", 60, "4")]
        body += [tick(f"Y{i}", i, "5") for i in range(1200)]  # more symbols than one chunk
        [answer] = await post_many(client, [body])
        assert answer["status"] == 200
        latest = await client.get("/ticks/Z/latest", headers=AUTH)
        assert (await latest.json())["price"] == "4"
    stored = json.loads(await redis.hget("ticks:latest", "Z") or b"{}")
    assert stored["price"] == "4"
    assert stored["id"] == answer["ids"][3]
    assert await redis.hlen("ticks:latest") == 1201
