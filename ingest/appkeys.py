"""The typed keys of what the ingest application holds (settings, clients, state)."""

from __future__ import annotations

from aiohttp import web

from ingest.auth import TokenAuth
from ingest.errors import Reminders
from ingest.history import TickHistory
from ingest.inflight import InFlight
from ingest.link import RedisLink
from ingest.metrics import RequestTimes
from tickpipe.core.redis_conn import RedisClient
from tickpipe.core.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
"""A bare client (the bench's baseline server); the ingest app links through LINK."""
LINK: web.AppKey[RedisLink] = web.AppKey("link")
"""Redis and what depends on its kind, once it has answered (ingest/link.py)."""
AUTH = web.AppKey("auth", TokenAuth)
READ_AUTH = web.AppKey("read_auth", TokenAuth)
"""Tokens that may read: every ingest token and every read-only token."""
INFLIGHT = web.AppKey("inflight", InFlight)
REMINDERS = web.AppKey("reminders", Reminders)
"""Refusals of a recurring kind (Redis down, misconfigured) are logged once, then reminded."""
REQUEST_TIMES = web.AppKey("request_times", RequestTimes)
"""Request durations, folded into the histogram every second (ingest/metrics.py)."""
STORE = web.AppKey("store", TickHistory)
