"""The typed keys of what the ingest application holds (settings, clients, state)."""

from __future__ import annotations

from aiohttp import web

from ingest.auth import TokenAuth
from ingest.backpressure import BacklogMonitor
from ingest.inflight import InFlight
from ingest.tickstore import TickStore
from ingest.writer import TickWriter
from tickpipe.redis_conn import RedisClient
from tickpipe.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
WRITER = web.AppKey("writer", TickWriter)
AUTH = web.AppKey("auth", TokenAuth)
READ_AUTH = web.AppKey("read_auth", TokenAuth)
"""Tokens that may read: every ingest token and every read-only token."""
BACKLOG = web.AppKey("backlog", BacklogMonitor)
INFLIGHT = web.AppKey("inflight", InFlight)
STORE = web.AppKey("store", TickStore)
