"""Fast unit tests: token auth, body decoding, the backlog measure (on fakeredis)."""

from __future__ import annotations

from typing import Any

import fakeredis
import msgspec
import pytest

from ingest.auth import TokenAuth
from ingest.backpressure import BacklogMonitor
from ingest.decode import decode_json_array, decode_ndjson, decode_tick
from ingest.errors import ApiError

TICK = b'{"symbol":"A","ts":1,"price":"1.5","volume":2,"source":"s"}'


def test_token_auth_names_the_token() -> None:
    auth = TokenAuth({"alpha": "t-alpha", "beta": "t-beta"})
    assert auth.identify("Bearer t-beta") == "beta"
    assert auth.identify("bearer  t-alpha ") == "alpha"
    assert auth.identify("Bearer t-gamma") is None
    assert auth.identify("Basic t-alpha") is None
    assert auth.identify("Bearer") is None
    assert auth.identify(None) is None


def test_ndjson_skips_blank_lines_and_counts_ticks() -> None:
    ticks = decode_ndjson(TICK + b"\n\n" + TICK.replace(b'"ts":1', b'"ts":2') + b"\r\n", 10)
    assert [t.ts_us for t in ticks] == [1000, 2000]


@pytest.mark.parametrize(
    ("body", "status", "code", "index", "field"),
    [
        (b"[]", 422, "invalid_batch", None, None),
        (b"{}", 422, "invalid_batch", None, None),
        (b"[" + b",".join([TICK] * 4) + b"]", 413, "batch_too_large", None, None),
        (b"[" + TICK + b',{"symbol":"A"}]', 422, "invalid_field", 1, "ts"),
        (
            b"[" + TICK + b"," + TICK.replace(b'"1.5"', b'"-1"') + b"]",
            422,
            "invalid_field",
            1,
            "price",
        ),
        (b"[" + TICK + b",", 400, "malformed_json", None, None),
    ],
)
def test_json_array_refusals(
    body: bytes, status: int, code: str, index: int | None, field: str | None
) -> None:
    with pytest.raises(ApiError) as info:
        decode_json_array(body, 3)
    assert (info.value.status, info.value.code) == (status, code)
    body: dict[str, Any] = msgspec.to_builtins(info.value.body)  # as the client reads it
    assert body.get("index") == index
    assert body.get("field") == field


def test_ndjson_bad_line_names_its_index() -> None:
    with pytest.raises(ApiError) as info:
        decode_ndjson(TICK + b"\n{oops\n", 10)
    assert info.value.status == 400
    assert info.value.body.index == 1


def test_single_tick_must_be_an_object() -> None:
    with pytest.raises(ApiError) as info:
        decode_tick(b"[" + TICK + b"]")
    assert info.value.status == 422


async def test_backlog_is_lag_plus_pending() -> None:
    redis = fakeredis.FakeAsyncRedis()
    monitor = BacklogMonitor(redis, ["s"], "g", limit=3, poll_s=1)
    assert await monitor.measure() == 0  # no stream yet
    await redis.xgroup_create("s", "g", id="0", mkstream=True)
    for _ in range(5):
        await redis.xadd("s", {"a": "1"})
    await redis.xreadgroup("g", "c", {"s": ">"}, count=2)
    monitor.backlog = await monitor.measure()
    assert monitor.backlog == 5  # lag 3 + pending 2
    assert monitor.over_limit
    await redis.aclose()


async def test_backlog_when_redis_reports_no_lag() -> None:
    class NoLag(fakeredis.FakeAsyncRedis):  # type: ignore[misc]
        async def xinfo_groups(self, name: str) -> list[dict[str, Any]]:
            groups: list[dict[str, Any]] = await super().xinfo_groups(name)
            return [{**g, "lag": None} for g in groups]

    redis = NoLag()
    await redis.xgroup_create("s", "g", id="0", mkstream=True)
    for _ in range(4):
        await redis.xadd("s", {"a": "1"})
    await redis.xreadgroup("g", "c", {"s": ">"}, count=1)
    monitor = BacklogMonitor(redis, ["s"], "g", limit=10, poll_s=1)
    assert await monitor.measure() == 4  # entries-added 4 - entries-read 1, + pending 1
    await redis.aclose()


def test_observe_many_equals_one_observe_per_value() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from ingest.metrics import observe_many

    values = [0.0, 0.0004, 0.0005, 0.003, 0.2, 7.0, 99.0, 0.0005]
    exposed = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", buckets=(0.0005, 0.01, 1.0), registry=registry)
        if bulk:
            observe_many(histogram, values)
        else:
            for value in values:
                histogram.observe(value)
        exposed.append(
            [
                line
                for line in generate_latest(registry).decode().splitlines()
                if "created" not in line
            ]
        )
    assert exposed[0] == exposed[1]
