"""The two reference endpoints `tickpipe bench` measures tickpipe against.

- ``direct``: the design tickpipe replaces, built fairly: each POST inserts its
  tick into Postgres (prepared statement, a pool sized for the machine) and
  answers after the COMMIT.
- ``bare``: the floor of any Redis-backed ingest: aiohttp, one XADD, no
  validation, no auth.

Run as ``python -m tickpipe.lab.bench_servers direct|bare --port P``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from tickpipe.core import redis_conn
from tickpipe.core.loop import new_event_loop
from tickpipe.core.ticks import tick_decoder, to_fields, validate

POOL = web.AppKey("pool", asyncpg.Pool)
REDIS = web.AppKey("redis", Redis)

INSERT_SQL = """
INSERT INTO md_ticks (symbol, ts, price, volume, source) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (symbol, ts) DO UPDATE
SET price = EXCLUDED.price, volume = EXCLUDED.volume, source = EXCLUDED.source
"""


def direct_app(database_url: str) -> web.Application:
    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        size = 2 * (os.cpu_count() or 2)
        app[POOL] = await asyncpg.create_pool(database_url, min_size=size, max_size=size)
        yield
        await app[POOL].close()

    async def post_tick(request: web.Request) -> web.Response:
        tick = validate(tick_decoder.decode(await request.read()))
        async with request.app[POOL].acquire() as conn:
            # asyncpg prepares and caches the statement per connection.
            await conn.execute(
                INSERT_SQL, tick.symbol, tick.ts, tick.price, tick.volume, tick.source
            )
        return web.json_response({"accepted": 1})

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/ingest/tick", post_tick)
    return app


def bare_app(redis_url: str) -> web.Application:
    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = redis_conn.connect(redis_url, client_name="tickpipe-bench-bare")
        yield
        await app[REDIS].aclose()

    async def post_tick(request: web.Request) -> web.Response:
        tick = validate(tick_decoder.decode(await request.read()))
        entry_id = await request.app[REDIS].xadd("bench.bare", to_fields(tick))  # type: ignore[arg-type]
        return web.json_response({"accepted": 1, "ids": [str(entry_id)]})

    app = web.Application()
    app.cleanup_ctx.append(redis_ctx)
    app.router.add_post("/ingest/tick", post_tick)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tickpipe.lab.bench_servers")
    parser.add_argument("kind", choices=["direct", "bare"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    app = direct_app(args.database_url) if args.kind == "direct" else bare_app(args.redis_url)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=lambda *_: None,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
