"""The hub's fan-out without a server: encode once, one write per client and read, drop the slow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from ingest import hubs, metrics
from ingest.hubs import RawEntry, StreamHub, Subscription
from tickpipe.core.ticks import Tick, to_fields, to_json


def entry(n: int, symbol: str) -> RawEntry:
    tick = Tick(symbol=symbol, ts_us=n, price=Decimal("1.5"), volume=Decimal(n), source="s")
    return (f"{n}-0".encode(), {k.encode(): v.encode() for k, v in to_fields(tick).items()})


class Client:
    """A subscriber's connection: what was written to it, and how much of it the client took.

    ``takes`` is "all" (reads at once), "none" (stalled: the connection keeps every
    byte), or "all but the last write" (always one write behind).
    """

    def __init__(self, takes: str = "all") -> None:
        self.writes: list[bytes] = []
        self.takes = takes
        self.gone = False

    def write(self, payload: bytes) -> int | None:
        if self.gone:
            return None
        self.writes.append(payload)
        return len(payload)

    def buffered(self) -> int:
        if self.takes == "none":
            return sum(map(len, self.writes))
        if self.takes == "all but the last write" and self.writes:
            return len(self.writes[-1])
        return 0

    def ids(self) -> list[str]:
        return [
            line.removeprefix("id: ")
            for payload in self.writes
            for line in payload.decode().split("\r\n")
            if line.startswith("id: ")
        ]


async def subscribe(
    hub: StreamHub, symbols: set[str] | None, client: Client, size: int = 100
) -> Subscription:
    sub = await hub.subscribe(
        None if symbols is None else frozenset(symbols), size, client.write, client.buffered
    )
    sub.go_live((0, 0))
    return sub


class QuietRedis:
    """A stream no entry ever reaches: the tests hand the hub its reads themselves."""

    async def xread(self, *args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()


@pytest.fixture
async def hub() -> AsyncIterator[StreamHub]:
    hub = StreamHub(QuietRedis(), "ticks.received")  # type: ignore[arg-type]
    hub._cursor = "0-0"  # as if started: subscribe() asks Redis for nothing
    yield hub
    await hub.stop()


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The symbol of every tick the hub turns into JSON."""
    seen: list[str] = []
    real = to_json

    def counting(tick: Tick) -> dict[str, str]:
        seen.append(tick.symbol)
        return real(tick)

    monkeypatch.setattr(hubs, "to_json", counting)
    return seen


async def test_each_entry_is_encoded_once_and_each_client_gets_one_write_per_read(
    hub: StreamHub, encoded: list[str]
) -> None:
    x_only, x_and_y, everything = Client(), Client(), Client()
    await subscribe(hub, {"X"}, x_only)
    await subscribe(hub, {"X", "Y"}, x_and_y)
    await subscribe(hub, None, everything)
    hub._dispatch([entry(1, "X"), entry(2, "Y"), entry(3, "X"), entry(4, "Z")])
    assert encoded == ["X", "Y", "X", "Z"]  # once each, for three clients
    assert [len(c.writes) for c in (x_only, x_and_y, everything)] == [1, 1, 1]
    assert x_only.ids() == ["1-0", "3-0"]
    assert x_and_y.ids() == ["1-0", "2-0", "3-0"]
    assert everything.ids() == ["1-0", "2-0", "3-0", "4-0"]
    frame_of_1 = everything.writes[0].split(b"\r\n\r\n")[0]
    assert x_only.writes[0].startswith(frame_of_1)
    assert x_and_y.writes[0].startswith(frame_of_1)
    assert frame_of_1.startswith(b'id: 1-0\r\nevent: tick\r\ndata: {"symbol":"X",')


async def test_entries_no_client_wants_are_not_decoded(hub: StreamHub, encoded: list[str]) -> None:
    client = Client()
    sub = await subscribe(hub, {"X"}, client)
    hub._dispatch([entry(1, "Y"), entry(2, "Z")])
    assert encoded == []
    assert client.writes == []
    hub.unsubscribe(sub)
    assert hub.clients == 0
    assert hub._by_symbol == {}


async def test_events_wait_for_the_catch_up_and_are_not_sent_twice(hub: StreamHub) -> None:
    client = Client()
    sub = await hub.subscribe(frozenset({"X"}), 100, client.write, client.buffered)
    hub._dispatch([entry(1, "X"), entry(2, "X")])
    hub._dispatch([entry(3, "X")])
    assert client.writes == []  # still catching up
    sub.go_live((2, 0))  # the catch-up sent up to 2-0
    assert client.ids() == ["3-0"]
    hub._dispatch([entry(3, "X"), entry(4, "X")])  # a read that overlaps the catch-up
    assert client.ids() == ["3-0", "4-0"]


async def test_a_client_that_holds_too_many_events_is_dropped_and_never_written_again(
    hub: StreamHub,
) -> None:
    slow, fast = Client(takes="none"), Client()
    dropped = metrics.SSE_DROPPED._value.get()
    slow_sub = await subscribe(hub, {"X"}, slow, size=3)
    await subscribe(hub, {"X"}, fast, size=3)
    hub._dispatch([entry(1, "X"), entry(2, "X")])
    hub._dispatch([entry(3, "X"), entry(4, "X")])  # 4 events held by a connection: too many
    hub._dispatch([entry(5, "X")])
    assert slow_sub.reason.startswith("too slow")
    assert slow.ids() == ["1-0", "2-0"]
    assert metrics.SSE_DROPPED._value.get() == dropped + 1
    assert fast.ids() == ["1-0", "2-0", "3-0", "4-0", "5-0"]  # the fast one never waited


async def test_a_client_one_write_behind_is_never_dropped(hub: StreamHub) -> None:
    """Its connection is never empty, yet it never holds more than one write's events."""
    client = Client(takes="all but the last write")
    sub = await subscribe(hub, {"X"}, client, size=4)  # 2 held + 2 new at each write
    for n in range(1, 200, 2):
        hub._dispatch([entry(n, "X"), entry(n + 1, "X")])
    assert not sub.ended
    assert len(client.ids()) == 200


async def test_a_client_whose_connection_closed_is_ended(hub: StreamHub) -> None:
    client, other = Client(), Client()
    sub = await subscribe(hub, {"X"}, client)
    await subscribe(hub, {"X"}, other)
    client.gone = True
    hub._dispatch([entry(1, "X")])
    assert sub.reason == "client gone"
    assert other.ids() == ["1-0"]


async def test_a_failing_client_ends_alone(hub: StreamHub) -> None:
    def broken(payload: bytes) -> int:
        raise OSError("the write failed")

    other = Client()
    sub = await hub.subscribe(frozenset({"X"}), 100, broken, lambda: 0)
    sub.go_live((0, 0))
    await subscribe(hub, {"X"}, other)
    hub._dispatch([entry(1, "X")])
    assert sub.reason == "server error"
    assert other.ids() == ["1-0"]
