"""The live chart page: served safely, and drawn by a real headless Chromium.

The browser tests start the ingest app on a real port, put history into
md_ticks, open ``/chart/{symbol}#token=...`` in Debian's chromium driven over
the DevTools protocol (a websocket, with aiohttp), post ticks while the page is
open, and check what the page shows and what its screenshot holds.
``CHART_SCREENSHOT=docs/chart.png`` also saves the screenshot there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from redis.asyncio import Redis

from ingest import chart
from ingest.app import create_app
from ingest.writer import TickWriter
from tickpipe.core.settings import Settings
from tickpipe.core.ticks import EPOCH, Tick

pytestmark = pytest.mark.services

WRITE_TOKEN = "test-token-0123456789"
READ_TOKEN = "read-token-0123456789"
WRITER = {"Authorization": f"Bearer {WRITE_TOKEN}"}
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
LINE_COLOUR = (0x0A, 0x63, 0xD6)  # LINE_COLOUR in ingest/static/chart.js
VIEWPORT = (1000, 600)
WAIT_S = 60  # a generous deadline on a shared machine; never a timing assertion


def reading(settings: Settings) -> Settings:
    return settings.replace(read_tokens={"dashboard": READ_TOKEN})


# -- the page over plain HTTP ---------------------------------------------------------


@pytest.fixture
async def client(settings: Settings, redis: Redis) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(reading(settings)))) as test_client:
        yield test_client


async def test_the_page_needs_no_token_and_allows_only_its_own_files(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/chart/AAPL")
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    page = await response.text()
    assert 'data-symbol="AAPL"' in page
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == ['<script src="../static/chart.js" defer>']
    assert "style=" not in page
    assert "<style" not in page
    # Every file the page loads is served, with a type the browser will not sniff.
    for link in re.findall(r'(?:src|href)="(\.\./static/[^"]+)"', page):
        asset = await client.get(f"/chart/{link}")
        assert asset.status == 200, link
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
        assert asset.content_type in {
            "text/javascript",
            "application/javascript",
            "text/css",
            "image/svg+xml",
        }, link


async def test_a_symbol_with_a_slash_is_its_own_page(client: TestClient[Any, Any]) -> None:
    response = await client.get("/chart/EUR%2FUSD")
    assert response.status == 200
    assert 'data-symbol="EUR/USD"' in await response.text()


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/chart/BAD%20SYMBOL", "symbol"),
        ("/chart/" + "X" * 33, "symbol"),
        ("/chart/%3Cscript%3E", "symbol"),
        (f"/chart/AAPL?token={READ_TOKEN}", "token"),
        ("/chart/AAPL?limit=5", "limit"),
    ],
)
async def test_bad_chart_requests_are_refused_as_json(
    client: TestClient[Any, Any], path: str, field: str
) -> None:
    response = await client.get(path)
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "invalid_parameter"
    assert body["field"] == field
    assert READ_TOKEN not in body["detail"]


STATIC_PROBES = [
    "/static/nope.js",
    "/static/chart.html",  # the page's template: served only as /chart/{symbol}
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/..%2Fapp.py",
    "/static/",
]


async def test_static_serves_only_the_pages_files(client: TestClient[Any, Any]) -> None:
    for path in STATIC_PROBES:
        response = await client.get(path)
        assert response.status == 404, path
        assert response.content_type == "application/json", path
        assert "create_app" not in await response.text()


# -- a real browser -------------------------------------------------------------------


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    found = found or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: apt-get install chromium (or set CHROMIUM=path)")
    return found


class Browser:
    """A headless Chromium in its own process group, with a temporary profile."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.log = profile.parent / "chromium.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    chromium_path(),
                    "--headless=new",
                    "--no-sandbox",  # the tests may run as root
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    f"--user-data-dir={profile}",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
                    "--force-device-scale-factor=1",
                    "--hide-scrollbars",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def devtools_port(self) -> int:
        """The port Chromium chose, from the DevToolsActivePort file it writes."""
        marker = self.profile / "DevToolsActivePort"
        async with asyncio.timeout(WAIT_S):
            while not marker.is_file() or not marker.read_text().strip():
                if self.process.poll() is not None:
                    raise AssertionError(f"chromium exited: {self.log.read_text(errors='replace')}")
                await asyncio.sleep(0.1)
        return int(marker.read_text().split()[0])

    def stop(self) -> None:
        """Kill the whole process group (browser, renderers, zygotes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


class DevTools:
    """Just enough of the Chrome DevTools protocol: calls, and the page's errors."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next_id = 0
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded: asyncio.Future[None] | None = None
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                self._replies.pop(data["id"]).set_result(data)
            elif data.get("method") == "Page.loadEventFired":
                if self._loaded is not None and not self._loaded.done():
                    self._loaded.set_result(None)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(data["params"]["exceptionDetails"]))
            elif data.get("method") == "Runtime.consoleAPICalled":
                if data["params"]["type"] == "error":
                    self.errors.append(json.dumps(data["params"]["args"]))
            elif data.get("method") == "Log.entryAdded":
                entry = data["params"]["entry"]
                # "network" entries are refused requests the page handles (401, a
                # server that is down); anything else (CSP, script) is a fault.
                if entry["level"] == "error" and entry["source"] != "network":
                    self.errors.append(f"{entry['source']}: {entry['text']}")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        reply = self._replies[self._next_id] = asyncio.get_running_loop().create_future()
        await self._ws.send_json({"id": self._next_id, "method": method, "params": params})
        async with asyncio.timeout(WAIT_S):
            data = await reply
        assert "error" not in data, data
        result: dict[str, Any] = data["result"]
        return result

    async def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until the page (with its script) has loaded."""
        self._loaded = asyncio.get_running_loop().create_future()
        await self.call("Page.navigate", url=url)
        async with asyncio.timeout(WAIT_S):
            await self._loaded

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """Poll a page expression until it is truthy (the page has no event to wait on)."""
        try:
            async with asyncio.timeout(WAIT_S):
                while not (value := await self.evaluate(expression)):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        except TimeoutError:
            state = await self.evaluate(PAGE_STATE)
            raise AssertionError(f"never true: {expression}; page: {state}") from None
        return value

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


PAGE_STATE = """({
  state: document.body.dataset.state,
  status: document.getElementById("status").textContent,
  points: Number(document.getElementById("chart").dataset.points),
  latest: document.getElementById("latest").textContent,
  chart: {...document.getElementById("chart").dataset},
  gaps: Number(document.body.dataset.gaps || 0),
  hash: location.hash,
  tokenForm: !document.getElementById("token-form").hidden,
})"""


@pytest.fixture
def browser() -> Iterator[Browser]:
    profile_root = Path(tempfile.mkdtemp(prefix="tickpipe-chromium-"))
    chromium = Browser(profile_root / "profile")
    try:
        yield chromium
    finally:
        chromium.stop()
        shutil.rmtree(profile_root, ignore_errors=True)


@pytest.fixture
async def devtools(browser: Browser) -> AsyncIterator[DevTools]:
    port = await browser.devtools_port()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        tools = DevTools(ws)
        for domain in ("Runtime", "Log", "Page"):
            await tools.call(f"{domain}.enable")
        # The viewport exactly (a headless window's size includes its frame).
        await tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=VIEWPORT[0],
            height=VIEWPORT[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        yield tools
        await tools.close()


class Server:
    """The ingest app on a real port, which can be stopped and started again on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(create_app(self.settings), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def server(settings: Settings, redis: Redis) -> AsyncIterator[Server]:
    running = Server(reading(settings))
    await running.start()
    yield running
    await running.stop()


def stamp(second: int) -> str:
    return (T0 + dt.timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wave(second: int) -> str:
    """A price that moves (the text of an exact decimal; the float only shapes the test data)."""
    return f"{185 + 3 * math.sin(second / 4) + second * 0.02:.4f}"


async def store_history(pg: asyncpg.Connection, symbol: str, prices: dict[int, str]) -> None:
    """Committed ticks of ``symbol``, one at T0 + each second, as the flushers would write."""
    await pg.copy_records_to_table(
        "md_ticks",
        records=[
            (symbol, T0 + dt.timedelta(seconds=s), Decimal(price), Decimal(s), "history")
            for s, price in prices.items()
        ],
        columns=["symbol", "ts", "price", "volume", "source"],
    )


async def post_ticks(base_url: str, symbol: str, prices: dict[int, str]) -> list[str]:
    """Ingest ticks through the HTTP API; their stream ids."""
    ticks = [
        {"symbol": symbol, "ts": stamp(s), "price": price, "volume": "1", "source": "live"}
        for s, price in prices.items()
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/ingest/ticks", json=ticks, headers=WRITER) as response,
    ):
        assert response.status == 200, await response.text()
        ids: list[str] = (await response.json())["ids"]
        return ids


def save_screenshot(png: bytes, path: Path) -> None:
    """Keep the screenshot with the test's files, and where CHART_SCREENSHOT says."""
    path.write_bytes(png)
    if target := os.environ.get("CHART_SCREENSHOT"):
        Path(target).write_bytes(png)


def line_pixels(png: bytes, box: dict[str, float]) -> list[tuple[int, int]]:
    """The pixels inside ``box`` (the canvas; CSS px are device px here) of the line's colour."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == VIEWPORT
    left, top = int(box["x"]), int(box["y"])
    canvas = image.crop((left, top, left + int(box["width"]), top + int(box["height"])))
    width = canvas.size[0]
    rgb = canvas.tobytes()
    return [
        (left + i % width, top + i // width)
        for i in range(len(rgb) // 3)
        if all(abs(rgb[3 * i + k] - LINE_COLOUR[k]) <= 24 for k in range(3))
    ]


async def test_the_chart_draws_history_then_live_ticks(
    server: Server, devtools: DevTools, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    history = {s: wave(s) for s in range(40)}
    history[32] = "188.618765432109876543"  # the highest: its label must be this exact text
    await store_history(pg, "CHART", history)
    await store_history(pg, "OTHER", {s: "1" for s in range(5)})

    await devtools.open(f"{server.url}/chart/CHART#token={READ_TOKEN}")
    await devtools.wait_for(
        "document.body.dataset.state === 'connected'"
        " && document.getElementById('chart').dataset.points === '40'"
    )
    first = await devtools.evaluate(PAGE_STATE)
    assert first["hash"] == ""  # the token left the address bar
    assert first["latest"] == history[39]
    assert first["chart"]["high"] == "188.618765432109876543"

    live = {s: wave(s) for s in range(40, 51)}
    live[51] = "186.000000000000000001"
    await post_ticks(server.url, "OTHER", {60: "2"})  # another symbol: not drawn
    await post_ticks(server.url, "CHART", live)
    await devtools.wait_for("document.getElementById('chart').dataset.points === '52'")
    page = await devtools.evaluate(PAGE_STATE)
    assert page["state"] == "connected"
    assert page["latest"] == "186.000000000000000001"
    assert page["chart"]["first"] == stamp(0)
    assert page["chart"]["last"] == stamp(51)
    assert page["chart"]["high"] == "188.618765432109876543"
    assert page["chart"]["low"] == min([*history.values(), *live.values()], key=Decimal)
    assert await devtools.evaluate("document.title") == "CHART 186.000000000000000001 · tickpipe"

    # Let the frame with the last points reach the screen, then look at the pixels.
    await devtools.evaluate("new Promise((done) => requestAnimationFrame(() => done(true)))")
    shot = base64.b64decode((await devtools.call("Page.captureScreenshot", format="png"))["data"])
    save_screenshot(shot, tmp_path / "chart.png")
    box = await devtools.evaluate(
        "(({x, y, width, height}) => ({x, y, width, height}))"
        "(document.getElementById('chart').getBoundingClientRect())"
    )
    drawn = line_pixels(shot, box)
    assert len(drawn) > 500, f"only {len(drawn)} pixels of the line colour"
    xs = [x for x, _ in drawn]
    ys = [y for _, y in drawn]
    # The line runs across the time range and from the lowest to the highest price.
    assert max(xs) - min(xs) > 0.7 * box["width"]
    assert max(ys) - min(ys) > 0.6 * box["height"]
    assert devtools.errors == []


async def test_a_reconnect_resumes_and_a_gap_reloads_history(
    server: Server, devtools: DevTools, pg: asyncpg.Connection, redis: Redis, settings: Settings
) -> None:
    await store_history(pg, "GAP", {s: wave(s) for s in range(20)})
    await devtools.open(f"{server.url}/chart/GAP#token={READ_TOKEN}")
    await devtools.wait_for("document.getElementById('chart').dataset.points === '20'")
    await devtools.wait_for("document.body.dataset.state === 'connected'")
    await post_ticks(server.url, "GAP", {s: wave(s) for s in range(20, 25)})
    await devtools.wait_for("document.getElementById('chart').dataset.points === '25'")

    await server.stop()
    await devtools.wait_for("document.body.dataset.state === 'reconnecting'")
    # While the page cannot connect: ticks arrive, the flushers store the first six,
    # and the stream is trimmed past the page's position (the first two are gone from it).
    writer = TickWriter.from_settings(redis, settings)
    missed = {s: wave(s) for s in range(25, 33)}
    ids = await writer.append(
        [Tick("GAP", tick_us(s), Decimal(p), Decimal(1), "live") for s, p in missed.items()]
    )
    await store_history(pg, "GAP", {s: missed[s] for s in range(25, 31)})
    await redis.xtrim(settings.stream_name, minid=ids[2], approximate=False)

    await server.start()  # same port
    await devtools.wait_for("document.getElementById('chart').dataset.points === '33'")
    page = await devtools.evaluate(PAGE_STATE)
    assert page["gaps"] == 1
    assert page["latest"] == missed[32]  # only the stream has this one: resumed by event id
    assert page["chart"]["last"] == stamp(32)
    await devtools.wait_for("document.body.dataset.state === 'connected'")
    assert devtools.errors == []


def tick_us(second: int) -> int:
    return int((T0 + dt.timedelta(seconds=second) - EPOCH).total_seconds()) * 1_000_000


async def test_without_a_token_the_page_asks_for_one(
    server: Server, devtools: DevTools, pg: asyncpg.Connection
) -> None:
    # A symbol with ":" and "/": the page's relative URLs must still name it whole.
    await store_history(pg, "FX:EUR/USD", {0: "1.5", 1: "1.25"})
    await devtools.open(f"{server.url}/chart/FX%3AEUR%2FUSD")
    await devtools.wait_for("document.body.dataset.state === 'token'")
    assert (await devtools.evaluate(PAGE_STATE))["tokenForm"] is True

    submit = """((token) => {
      document.getElementById("token-input").value = token;
      document.getElementById("token-form").requestSubmit();
      return true;
    })"""
    await devtools.evaluate(f"{submit}('wrong-token')")
    await devtools.wait_for("document.getElementById('status').textContent.includes('401')")
    page = await devtools.evaluate(PAGE_STATE)
    assert page["state"] == "token"
    assert page["points"] == 0

    await devtools.evaluate(f"{submit}({json.dumps(READ_TOKEN)})")
    await devtools.wait_for("document.body.dataset.state === 'connected'")
    await devtools.wait_for("document.getElementById('chart').dataset.points === '2'")
    assert await devtools.evaluate("sessionStorage.length") == 1
    assert (await devtools.evaluate(PAGE_STATE))["latest"] == "1.25"
    assert devtools.errors == []


async def test_the_page_reads_every_framing_of_an_event_stream(devtools: DevTools) -> None:
    """CRLF split across chunks, LF only, CR only, no space after the colon, a line in halves."""
    ticks = [
        json.dumps({"symbol": "F", "ts": stamp(s), "price": f"{s}.5", "volume": "1", "source": "x"})
        for s in range(1, 5)
    ]
    pieces = [
        ": ping\r\n\r\n",
        "event: tick\r",
        f"\nid: 1-0\r\ndata: {ticks[0]}\r\n\r\n",
        f"event:tick\nid:2-0\ndata:{ticks[1]}\n\n",
        f"event: tick\rid: 3-0\rdata: {ticks[2]}\r\r",
        f"event: tick\r\nid: 4-0\r\ndata: {ticks[3][:20]}",
        f"{ticks[3][20:]}\r\n\r\n",
        "event: news\r\ndata: not a tick\r\n\r\n",
    ]
    seen: list[tuple[str, dict[str, str]]] = []

    async def history(request: web.Request) -> web.Response:
        seen.append((str(request.rel_url), dict(request.headers)))
        return web.json_response({"symbol": "F", "order": "newest_first", "ticks": []})

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.append((str(request.rel_url), dict(request.headers)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece.encode())
            await asyncio.sleep(0.05)  # most likely a chunk of its own
        await asyncio.Event().wait()  # open until the server stops
        return response

    app = web.Application()
    app.router.add_get("/ticks/stream", stream)
    app.router.add_get("/ticks/{symbol}", history)
    chart.add_routes(app)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        await devtools.open(f"http://127.0.0.1:{port}/chart/F#token=opaque-token-value")
        await devtools.wait_for("document.getElementById('chart').dataset.points === '4'")
        assert (await devtools.evaluate(PAGE_STATE))["latest"] == "4.5"
    finally:
        await runner.cleanup()
    assert [url.split("?")[0] for url, _ in seen] == ["/ticks/F", "/ticks/stream"]
    for url, headers in seen:
        assert headers["Authorization"] == "Bearer opaque-token-value"
        assert "opaque-token-value" not in url
    assert re.fullmatch(r"\d+-0", seen[1][1]["Last-Event-ID"])  # the replay before history
    assert devtools.errors == []
