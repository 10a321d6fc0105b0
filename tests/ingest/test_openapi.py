"""The served OpenAPI document against the real service.

Every answer a request gets is checked against what the document says for its
status (schema, error code, headers, event stream); and every answer the
document lists (each status with each error code it names) is produced by a
real request, so the document says no more and no less than the service does.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import jsonschema
import openapi_spec_validator
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import OpenAPIV31SpecValidator
from redis.asyncio import Redis

from ingest.app import create_app
from ingest.appkeys import LINK
from ingest.openapi import openapi_document
from tests.conftest import fresh_database
from tests.ingest.conftest import read_event_fields
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import LocalStack, free_port
from tickpipe.rollup.store import RollupStore

pytestmark = pytest.mark.services

WRITER = {"Authorization": "Bearer test-token-0123456789"}
READER = {"Authorization": "Bearer read-token-0123456789"}
JSON = {"Content-Type": "application/json"}
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
T0_MS = 1714564800000
Client = TestClient[Any, Any]
Serve = Callable[..., AbstractAsyncContextManager[Client]]
Outcome = tuple[str, str, int, str | None]  # path, method, status, error code


def tick(symbol: str = "AAPL", ms: int = T0_MS, price: str = "189.12") -> dict[str, Any]:
    return {"symbol": symbol, "ts": ms, "price": price, "volume": 100, "source": "nasdaq"}


def dead_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def dead_postgres() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/tickpipe"


# -- the checker ------------------------------------------------------------------------


def documented(document: dict[str, Any], *paths: str) -> set[Outcome]:
    """Every answer the document lists for ``paths``: each error code of each status."""
    outcomes: set[Outcome] = set()
    for path in paths:
        for method, operation in document["paths"][path].items():
            for status, response in operation["responses"].items():
                for codes in (
                    error_codes(media["schema"]) for media in response["content"].values()
                ):
                    for code in codes or [None]:
                        outcomes.add((path, method, int(status), code))
    return outcomes


def error_codes(schema: dict[str, Any]) -> list[str]:
    """The codes a refusal's schema narrows ``error`` to ([] for other answers)."""
    for part in schema.get("allOf", []):
        if "enum" in part.get("properties", {}).get("error", {}):
            return list(part["properties"]["error"]["enum"])
    return []


class Contract:
    """Checks real answers against the document and notes which answers it has seen."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.seen: set[Outcome] = set()

    def validate(self, instance: Any, schema: dict[str, Any]) -> None:
        jsonschema.validate(
            instance,
            {**schema, "components": self.document["components"]},
            cls=jsonschema.Draft202012Validator,
        )

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def response(self, path: str, method: str, status: int) -> dict[str, Any]:
        responses = self.document["paths"][path][method]["responses"]
        assert str(status) in responses, f"{method} {path} answered {status}, not documented"
        documented_response: dict[str, Any] = responses[str(status)]
        return documented_response

    async def check(
        self, path: str, method: str, answer: aiohttp.ClientResponse, *, events: int = 0
    ) -> Any:
        """Check one answer; ``events``: how many to read and check of an event stream."""
        documented_response = self.response(path, method, answer.status)
        for header in documented_response.get("headers", {}):
            assert header in answer.headers, f"{method} {path} {answer.status}: no {header}"
        assert answer.content_type in documented_response["content"], answer.content_type
        schema = documented_response["content"][answer.content_type]["schema"]
        code = None
        body: Any
        if answer.content_type == "application/json":
            body = await answer.json()
            self.validate(body, schema)
            if error_codes(schema):
                code = body["error"]
        elif answer.content_type == "text/event-stream":
            body = await read_event_fields(answer, events)
            for event in body:
                self.check_event(event, schema)
        else:
            body = await answer.text()
            self.validate(body, schema)
        self.seen.add((path, method, answer.status, code))
        return body

    async def more_events(
        self, path: str, answer: aiohttp.ClientResponse, count: int
    ) -> list[dict[str, str]]:
        """The next ``count`` events of an event stream already checked, checked too."""
        schema = self.response(path, "get", answer.status)["content"]["text/event-stream"]
        events = await read_event_fields(answer, count)
        for event in events:
            self.check_event(event, schema["schema"])
        return events

    def check_event(self, event: dict[str, str], schema: dict[str, Any]) -> None:
        """The event's fields against the schema, and its JSON ``data`` against contentSchema."""
        self.validate(event, schema)
        [branch] = [
            b
            for b in self.resolve(schema)["oneOf"]
            if b["properties"]["event"]["const"] == event["event"]
        ]
        self.validate(json.loads(event["data"]), branch["properties"]["data"]["contentSchema"])


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def contract() -> Contract:
    return Contract(openapi_document())


@pytest.fixture
def serve(settings: Settings, redis: Redis) -> Serve:
    """An app with a read-only token and small limits; keyword arguments change settings."""

    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Client]:
        changed = settings.replace(
            read_tokens={"dashboard": "read-token-0123456789"},
            ingest_max_body_bytes=10_000,
            ingest_max_batch=10,
            **overrides,
        )
        # Each app is a deployment of its own (its STREAM_SHARDS may differ).
        await redis.delete("tickpipe:shape")
        async with TestClient(TestServer(create_app(changed))) as client:
            yield client

    return make


# -- the document itself ----------------------------------------------------------------


async def test_the_served_document_is_the_one_checked_and_covers_every_route(
    serve: Serve, contract: Contract
) -> None:
    async with serve() as client:
        answer = await client.get("/openapi.json")
        assert await contract.check("/openapi.json", "get", answer) == contract.document
        routes = {
            (route.resource.canonical, route.method.lower())
            for route in client.app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        }
    assert routes == {
        (path, method) for path, item in contract.document["paths"].items() for method in item
    }
    # Valid OpenAPI 3.1, so that the tools that read it (viewers, client generators) can.
    openapi_spec_validator.validate(contract.document, cls=OpenAPIV31SpecValidator)
    roles = {
        role
        for item in contract.document["paths"].values()
        for operation in item.values()
        for requirement in operation.get("security", [])
        for role in requirement["bearer"]
    }
    assert roles == {"ingest", "read"}


# -- ingest -----------------------------------------------------------------------------


async def test_every_ingest_answer_is_documented_and_produced(
    serve: Serve, contract: Contract, redis: Redis
) -> None:
    good = json.dumps(tick()).encode()
    bodies = {"/ingest/tick": good, "/ingest/ticks": b"[" + good + b"]"}
    ndjson = {"Content-Type": "application/x-ndjson"}
    requests: list[tuple[str, dict[str, str], bytes]] = [
        ("/ingest/tick", {**JSON, **WRITER}, good),
        ("/ingest/ticks", {**JSON, **WRITER}, json.dumps([tick(), tick(ms=T0_MS + 1)]).encode()),
        ("/ingest/tick", JSON, good),
        ("/ingest/ticks", JSON, good),
        ("/ingest/tick", {**JSON, **READER}, good),
        ("/ingest/ticks", {**JSON, **READER}, good),
        ("/ingest/tick", {**JSON, **WRITER}, b"{"),
        ("/ingest/ticks", {**ndjson, **WRITER}, good + b"\n{\n"),
        ("/ingest/tick", {**JSON, **WRITER}, b" " * 10_001),
        ("/ingest/ticks", {**JSON, **WRITER}, b" " * 10_001),
        ("/ingest/ticks", {**JSON, **WRITER}, json.dumps([tick()] * 11).encode()),
        ("/ingest/tick", {"Content-Type": "text/csv", **WRITER}, b"a,b"),
        ("/ingest/ticks", {"Content-Type": "text/csv", **WRITER}, b"a,b"),
        ("/ingest/tick", {**JSON, **WRITER}, json.dumps(tick(price="-1")).encode()),
        ("/ingest/ticks", {**JSON, **WRITER}, json.dumps([tick(), {"ts": 1}]).encode()),
        ("/ingest/ticks", {**JSON, **WRITER}, b"[]"),
    ]
    async with serve() as client:
        for path, headers, body in requests:
            await contract.check(path, "post", await client.post(path, data=body, headers=headers))
    stored = await redis.xlen("ticks.received")
    assert stored == 3  # the refused requests appended nothing

    # The flushers are behind: more entries than the limit wait for them.
    async with serve(ingest_max_backlog=1) as client:
        for path, body in bodies.items():
            answer = await client.post(path, data=body, headers={**JSON, **WRITER})
            await contract.check(path, "post", answer)
    # No replica confirms within the wait: not durable.
    async with serve(ingest_durability="replica", ingest_wait_timeout_ms=10) as client:
        for path, body in bodies.items():
            answer = await client.post(path, data=body, headers={**JSON, **WRITER})
            await contract.check(path, "post", answer)
    async with serve(redis_url=dead_redis()) as client:
        for path, body in bodies.items():
            answer = await client.post(path, data=body, headers={**JSON, **WRITER})
            await contract.check(path, "post", answer)
    # Two shards, one of which cannot take writes: a batch is stored in part.
    async with serve(stream_shards=2) as client:
        shards = client.app[LINK].get().settings.shard_map
        one = "A"
        other = next(s for s in "BCDEFGH" if shards.for_symbol(s) != shards.for_symbol(one))
        broken = shards.for_symbol(other).stream
        await redis.delete(broken)
        await redis.set(broken, "not a stream")
        batch = json.dumps([tick(one), tick(other)]).encode()
        answer = await client.post("/ingest/ticks", data=batch, headers={**JSON, **WRITER})
        await contract.check("/ingest/ticks", "post", answer)

    assert contract.seen == documented(contract.document, "/ingest/tick", "/ingest/ticks")


# -- reads ------------------------------------------------------------------------------


async def test_every_read_answer_is_documented_and_produced(
    serve: Serve, contract: Contract, pg: asyncpg.Connection
) -> None:
    latest, ticks = "/ticks/{symbol}/latest", "/ticks/{symbol}"
    await pg.executemany(
        "INSERT INTO md_ticks (symbol, ts, price, volume, source) VALUES ($1, $2, $3, 1, 's')",
        [("MSFT", T0 + dt.timedelta(seconds=i), Decimal(f"410.{i}")) for i in range(3)],
    )
    async with serve() as client:
        posted = await client.post("/ingest/tick", json=tick(), headers=WRITER)
        assert posted.status == 200
        origins = set()
        for symbol in ("AAPL", "MSFT"):  # in the latest-price hash; only in Postgres
            answer = await client.get(f"/ticks/{symbol}/latest", headers=READER)
            origins.add((await contract.check(latest, "get", answer))["origin"])
        assert origins == {"stream", "store"}
        for url, headers in [
            ("/ticks/NOPE/latest", READER),
            ("/ticks/MSFT/latest", {}),
            ("/ticks/MSFT/latest?limit=1", READER),
        ]:
            await contract.check(latest, "get", await client.get(url, headers=headers))

        orders = []
        for url in ["/ticks/MSFT?limit=2", f"/ticks/MSFT?from={T0_MS}&limit=2"]:
            body = await contract.check(ticks, "get", await client.get(url, headers=READER))
            orders.append(body["order"])
        assert orders == ["newest_first", "oldest_first"]
        assert body["next"] is not None
        last = await contract.check(ticks, "get", await client.get(body["next"], headers=READER))
        assert (len(last["ticks"]), last["next"], last["next_cursor"]) == (1, None, None)
        for url, headers in [("/ticks/MSFT", {}), ("/ticks/MSFT?limit=0", READER)]:
            await contract.check(ticks, "get", await client.get(url, headers=headers))

    async with serve(database_url=dead_postgres(), query_timeout_s=2.0) as client:
        for path, url in [(latest, "/ticks/MSFT/latest"), (ticks, "/ticks/MSFT")]:
            await contract.check(path, "get", await client.get(url, headers=READER))

    assert contract.seen == documented(contract.document, latest, ticks)


async def test_every_event_stream_answer_is_documented_and_produced(
    serve: Serve, contract: Contract, redis: Redis
) -> None:
    path = "/ticks/stream"
    async with serve(sse_max_clients=1) as client:
        batch = [tick(ms=T0_MS + i) for i in range(4)]
        posted = await client.post("/ingest/ticks", json=batch, headers=WRITER)
        ids = (await posted.json())["ids"]
        await redis.xtrim("ticks.received", minid=ids[2], approximate=False)
        # Resuming after a trimmed entry: a gap, then the ticks still there.
        answer = await client.get(
            f"{path}?symbols=AAPL", headers={**READER, "Last-Event-ID": ids[0]}
        )
        events = await contract.check(path, "get", answer, events=3)
        # A tick posted after those three comes from the live phase: the client is counted.
        posted = await client.post("/ingest/tick", json=tick(ms=T0_MS + 9), headers=WRITER)
        ids += (await posted.json())["ids"]
        events += await contract.more_events(path, answer, 1)
        assert [(e["event"], e.get("id")) for e in events] == [
            ("gap", None),
            ("tick", ids[2]),
            ("tick", ids[3]),
            ("tick", ids[4]),
        ]
        # One client is the limit: while it listens, another is refused.
        await contract.check(path, "get", await client.get(path, headers=READER))
        answer.close()
        for url, headers in [
            (path, {}),
            (f"{path}?symbols=", READER),
            (path, {**READER, "Last-Event-ID": "yesterday"}),
        ]:
            await contract.check(path, "get", await client.get(url, headers=headers))
    async with serve(redis_url=dead_redis()) as client:
        await contract.check(path, "get", await client.get(path, headers=READER))

    assert contract.seen == documented(contract.document, path)


async def test_every_ranges_answer_is_documented_and_produced(
    serve: Serve, contract: Contract, stack: LocalStack
) -> None:
    path = "/ranges/{symbol}"
    url = await fresh_database(stack, "tickpipe_openapi_rollups")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO md_ticks (symbol, ts, price, volume, source) VALUES"
            " ('AAPL', $1, 189.12, 100, 's'), ('AAPL', $2, 189.5, 1, 's')",
            T0 + dt.timedelta(milliseconds=100),
            T0 + dt.timedelta(milliseconds=900),
        )
    finally:
        await conn.close()
    rollups = await RollupStore.open(url)
    while (await rollups.merge_pass(100, (1, 60))).marks:
        pass
    await rollups.close()

    async with serve(database_url=url) as client:
        answer = await client.get(f"/ranges/AAPL?at={T0_MS + 500}", headers=READER)
        body = await contract.check(path, "get", answer)
        assert [(r["width"], r["count"]) for r in body["ranges"]] == [("1s", 2), ("1m", 2)]
        for query, headers in [(f"?at={T0_MS}", {}), ("", READER)]:
            answer = await client.get(f"/ranges/AAPL{query}", headers=headers)
            await contract.check(path, "get", answer)
    plain = await fresh_database(stack, "tickpipe_openapi_plain", rollups=False)
    async with serve(database_url=plain) as client:
        answer = await client.get(f"/ranges/AAPL?at={T0_MS}", headers=READER)
        await contract.check(path, "get", answer)
    async with serve(database_url=dead_postgres(), query_timeout_s=2.0) as client:
        answer = await client.get(f"/ranges/AAPL?at={T0_MS}", headers=READER)
        await contract.check(path, "get", answer)

    assert contract.seen == documented(contract.document, path)


# -- operations -------------------------------------------------------------------------


async def test_every_operations_answer_is_documented_and_produced(
    serve: Serve, contract: Contract
) -> None:
    paths = ("/healthz", "/readyz", "/metrics", "/openapi.json")
    async with serve() as client:
        for path in paths:
            await contract.check(path, "get", await client.get(path))
    async with serve(redis_url=dead_redis()) as client:
        await contract.check("/readyz", "get", await client.get("/readyz"))

    assert contract.seen == documented(contract.document, *paths)


async def test_every_chart_page_answer_is_documented_and_produced(
    serve: Serve, contract: Contract
) -> None:
    async with serve() as client:
        await contract.check("/chart/{symbol}", "get", await client.get("/chart/AAPL"))
        await contract.check("/chart/{symbol}", "get", await client.get("/chart/AAPL?token=x"))
        for name in ("chart.js", "chart.css", "favicon.svg", "chart.html"):
            await contract.check("/static/{name}", "get", await client.get(f"/static/{name}"))

    assert contract.seen == documented(contract.document, "/chart/{symbol}", "/static/{name}")
