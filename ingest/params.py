"""Checks every read endpoint makes of a request: the reader's token, the symbol in
the path, the query parameters it knows, and integers as JSON writes them."""

from __future__ import annotations

import re

from aiohttp import web
from multidict import MultiMapping

from ingest.appkeys import READ_AUTH
from ingest.errors import ApiError, unauthorized
from tickpipe.core.ticks import SYMBOL

_INTEGER = re.compile(r"0|[1-9][0-9]{0,18}")


def small_uint(raw: str) -> int | None:
    """``raw`` as an integer if JSON would write it so (ASCII digits, no leading zero)
    and it has at most 19 digits (below 2**64), else None.

    Not ``str.isdigit()``: it also takes ``²`` (which ``int()`` refuses) and other
    scripts' digits (which ``int()`` reads as numbers no client meant), and
    ``int()`` refuses more than 4300 digits; each was a 500.
    """
    return int(raw) if _INTEGER.fullmatch(raw) else None


def authenticate_read(request: web.Request) -> str:
    """The name of a token allowed to read (401 otherwise)."""
    name = request.app[READ_AUTH].identify(request.headers.get("Authorization"))
    if name is None:
        raise unauthorized()
    return name


def path_symbol(request: web.Request) -> str:
    symbol = request.match_info["symbol"]
    if SYMBOL.fullmatch(symbol) is None:
        raise ApiError(
            422, "invalid_parameter", "symbol must be 1-32 of A-Z a-z 0-9 . _ : / -", field="symbol"
        )
    return symbol


def check_known(query: MultiMapping[str], *known: str) -> None:
    """Refuse unknown or repeated parameters: a typo must not silently mean 'all'."""
    for name in query:
        if name not in known:
            expected = f"known: {', '.join(known)}" if known else "it takes none"
            raise ApiError(
                422, "invalid_parameter", f"unknown parameter {name!r} ({expected})", field=name
            )
        if len(query.getall(name)) > 1:
            raise ApiError(422, "invalid_parameter", f"{name} is given twice", field=name)
