"""The live chart: ``GET /chart/{symbol}``, a static page that draws one symbol's ticks.

The page holds no data and needs no token: its script (``/static/chart.js``)
reads history from ``GET /ticks/{symbol}`` and follows ``GET /ticks/stream``
with the read token the user gives it in the URL fragment (``#token=...``),
which browsers never send to the server. A strict Content-Security-Policy
allows only the page's own script, stylesheet and requests.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from aiohttp import web

from ingest.errors import ApiError
from ingest.params import path_symbol

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

ASSETS = {
    "chart.js": "text/javascript; charset=utf-8",
    "chart.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""What /static/ serves, with its type: an allow-list, so nothing else in the package is
reachable, and types that do not depend on the host's mime.types."""
ASSET_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # Revalidated each time (a 304 when unchanged): a new release's script is used at once.
    "Cache-Control": "no-cache",
}

_page = Template((STATIC_DIR / "chart.html").read_text(encoding="utf-8"))


def render_page(symbol: str) -> str:
    """The page for ``symbol`` (already validated; escaped all the same)."""
    return _page.substitute(symbol=html.escape(symbol, quote=True))


async def get_chart(request: web.Request) -> web.Response:
    """GET /chart/{symbol}: the live chart page of one symbol."""
    symbol = path_symbol(request)
    for name in request.query:
        if name == "token":
            # A query string lands in access logs, proxies and browser history.
            detail = "never put a token in the query string: open /chart/{symbol}#token=..."
        else:
            detail = f"unknown parameter {name!r}: the chart page takes no query parameters"
        raise ApiError(422, "invalid_parameter", detail, field=name)
    return web.Response(
        text=render_page(symbol), content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )


async def get_asset(request: web.Request) -> web.FileResponse:
    """GET /static/{name}: one of the page's files (ETag and conditional requests included)."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return web.FileResponse(
        STATIC_DIR / name, headers={**ASSET_HEADERS, "Content-Type": ASSETS[name]}
    )


def add_routes(app: web.Application) -> None:
    """The chart page and the static files it loads."""
    app.router.add_get("/chart/{symbol}", get_chart)
    app.router.add_get("/static/{name}", get_asset)
